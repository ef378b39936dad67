"""Every IDelivery keeps the same contract: the shipped fake and the real ones alike."""

from __future__ import annotations

import glob
import os

import pytest
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from smtpbridge.demo import MailFolderDelivery
from smtpbridge.interfaces import IDelivery, ITransaction
from smtpbridge.mapping import StaticMapper
from smtpbridge.model import Assignment, ClientInfo, Reply, Route, UpstreamAccount
from smtpbridge.relay import InlineDelivery
from smtpbridge.secret import Secret
from smtpbridge.testing import FakeUpstream, MemoryDelivery

CLIENT = ClientInfo("192.0.2.1", 40000, "test", "abc123", helo="printer", login="device")


class MemoryHarness:
    def __init__(self, tmp_path) -> None:
        self.delivery = MemoryDelivery()

    def stored(self) -> list[bytes]:
        return [message.data for message in self.delivery.messages]


class FolderHarness:
    def __init__(self, tmp_path) -> None:
        self.directory = str(tmp_path / "mail")
        self.delivery = MailFolderDelivery(self.directory)

    def stored(self) -> list[bytes]:
        result = []
        for path in sorted(glob.glob(os.path.join(self.directory, "new", "*.eml"))):
            with open(path, "rb") as f:
                result.append(f.read())
        return result


class InlineHarness:
    """In-line delivery to the fake upstream: stored is what the upstream accepted."""

    def __init__(self, tmp_path) -> None:
        self.upstream = FakeUpstream()
        account = UpstreamAccount("relay@example.com", Secret("upstream-pass"))
        mapper = StaticMapper(Assignment((Route("smtp.example.com"),), account))
        self.delivery = InlineDelivery(mapper, self.upstream)

    def stored(self) -> list[bytes]:
        return [message.body for message in self.upstream.messages]


@pytest.fixture(params=[MemoryHarness, FolderHarness, InlineHarness],
                ids=["memory", "folder", "inline"])
def harness(request, tmp_path):
    return request.param(tmp_path)


def result_of(d) -> Reply:
    results = []
    d.addBoth(results.append)
    assert results, "the reply did not come synchronously"
    return results[0]


def test_provides_the_interfaces(harness):
    assert verifyObject(IDelivery, harness.delivery)
    assert verifyObject(ITransaction, harness.delivery.transaction(CLIENT))


def test_a_whole_transaction_stores_the_lines(harness):
    transaction = harness.delivery.transaction(CLIENT)
    assert result_of(transaction.mail("a@example.com", {})).code == 250
    assert result_of(transaction.rcpt("b@example.com", {})).code == 250
    assert result_of(transaction.data(StringTransport())).code == 354
    transaction.write([b"Subject: x", b""])
    transaction.write([b".dot", b"8bit \xff"])
    assert result_of(transaction.finish()).code == 250
    assert harness.stored() == [b"Subject: x\r\n\r\n.dot\r\n8bit \xff\r\n"]


def test_an_aborted_transaction_stores_nothing(harness):
    transaction = harness.delivery.transaction(CLIENT)
    transaction.mail("a@example.com", {})
    transaction.rcpt("b@example.com", {})
    transaction.data(StringTransport())
    transaction.write([b"half a message"])
    transaction.abort()
    assert harness.stored() == []
