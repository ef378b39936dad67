"""The summary line: one per message, with its status, envelope, account, route, upstream,
queue id and delays; in memory (for exact delays and every status) and end to end."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from smtpbridge.interfaces import IReportingTransaction
from smtpbridge.model import MessageOutcome, Reply
from smtpbridge.summary import queue_id
from smtpbridge.testing import MemoryDelivery, MemoryTransaction
from tests.conftest import PASSWORD, UPSTREAM_PASSWORD, client_context
from tests.test_relay import (
    RECIPIENT,
    SENDER,
    Relay,
    Start,
    closed_port,
    relay,
    relay_toml,
    reply_to_mail,
    smtps,
)
from tests.test_server import Session
from tests.upstream import Upstream, upstream, upstream_factory

FIXTURES = (relay, relay_toml, upstream, upstream_factory)


@pytest.fixture
def summaries() -> Any:
    """Every summary event of the test, as it was logged."""
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if "nrcpt" in event and "status" in event:  # a summary line, whatever its logger
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def test_queue_ids_of_common_upstreams() -> None:
    assert queue_id(Reply(250, "2.0.0", "Ok: queued as 4Ck9Xb0PZLz3x")) == "4Ck9Xb0PZLz3x"
    microsoft = "AM0PR0@AM0PR0.eurprd.prod.outlook.com"
    assert queue_id(Reply(250, "2.0.0", f"OK <{microsoft}> [Hostname=AM0PR0]")) == microsoft
    assert queue_id(Reply(250, "2.0.0", "OK  1700000000 a1-20020a05.12 - gsmtp")) == \
        "a1-20020a05.12"
    assert queue_id(Reply(250, None, "OK id=1rABCd-000123-Xy")) == "1rABCd-000123-Xy"
    assert queue_id(Reply(250, "2.0.0", "Ok: stored as 1700000000.abc")) == "1700000000.abc"
    assert queue_id(Reply(250, "2.0.0", "OK queued")) is None


# In memory: exact delays, and the statuses a spool reports by the same means.

@implementer(IReportingTransaction)
class ReportingTransaction(MemoryTransaction):
    """A memory transaction that reports a given outcome, as a spool would."""

    outcome: MessageOutcome | None = None


class SpoolLike(MemoryDelivery):
    def __init__(self, outcome: MessageOutcome) -> None:
        super().__init__()
        self.outcome = outcome

    def transaction(self, client: Any) -> ReportingTransaction:
        transaction = ReportingTransaction(self, client)
        transaction.outcome = self.outcome
        self.transactions.append(transaction)
        return transaction


def send_in_memory(s: Session, body: str = "Subject: x\r\n\r\nhi\r\n") -> list[str]:
    s.command("EHLO client.test")
    assert s.command(f"MAIL FROM:<{SENDER}>")[0].startswith("250")
    s.clock.advance(1.5)  # the client takes its time
    assert s.command(f"RCPT TO:<{RECIPIENT}>")[0].startswith("250")
    s.command("RCPT TO:<second@example.com>")
    assert s.command("DATA")[0].startswith("354")
    s.clock.advance(2.0)
    s.delivery.hold_replies = True
    s.send(body + ".\r\n")
    s.clock.advance(0.25)  # the delivery takes its time
    s.delivery.release_all()
    return s.read()


@pytest.mark.parametrize("status", ["spooled", "bounced"])
def test_a_delivery_reports_its_own_status(summaries: list[dict[str, Any]],
                                           status: str) -> None:
    s = Session()
    s.factory.delivery = SpoolLike(MessageOutcome(status, account="scanner", route="m365",
                                                  queue_id="S123"))
    assert send_in_memory(s)[0].startswith("250")
    [event] = summaries
    assert (event["status"], event["account"], event["route"], event["queue_id"]) == (
        status, "scanner", "m365", "S123")
    text = formatEvent(event)
    assert f"status={status} " in text and "queue_id=S123 " in text
    assert "why" not in text and event["why"] is None


def test_a_spooled_message_says_why(summaries: list[dict[str, Any]]) -> None:
    s = Session()
    why = Reply(451, "4.4.1", "Upstream smtp.example.com:587 unreachable: connection refused")
    s.factory.delivery = SpoolLike(MessageOutcome("spooled", queue_id="S123", why=why))
    assert send_in_memory(s)[0].startswith("250")
    [event] = summaries
    assert event["why"] == f"451 4.4.1 {why.text}"
    assert formatEvent(event).endswith(f"(250 2.0.0 Ok: queued; upstream: 451 4.4.1 {why.text})")


def test_delays_split_client_and_upstream_time(summaries: list[dict[str, Any]]) -> None:
    s = Session()
    assert send_in_memory(s)[0].startswith("250")
    [event] = summaries
    assert event["client_time"] == pytest.approx(3.5)
    assert event["upstream_time"] == pytest.approx(0.25)
    assert event["delay"] == pytest.approx(3.75)
    assert event["recipients"] == [RECIPIENT, "second@example.com"]
    assert event["nrcpt"] == 2 and event["size"] == len("Subject: x\r\n\r\nhi\r\n")
    assert (event["client"], event["listener"], event["login"]) == ("127.0.0.1", "test", None)
    text = formatEvent(event)
    assert text.startswith(f"{s.protocol.client.session_id} status=sent from=<{SENDER}> "
                           f"to=<{RECIPIENT}>,<second@example.com> nrcpt=2 size=")
    assert "delay=3.75 delays=3.50/0.25 (250 2.0.0 Ok: queued)" in text


def test_a_message_too_big_is_refused(summaries: list[dict[str, Any]]) -> None:
    s = Session(max_message_size=1024)
    assert send_in_memory(s, "x" * 2000 + "\r\n")[0].startswith("552")
    [event] = summaries
    assert (event["status"], event["code"], event["dsn"]) == ("refused", 552, "5.3.4")


def test_no_line_for_a_transaction_the_client_drops(summaries: list[dict[str, Any]]) -> None:
    s = Session()
    s.command("EHLO client.test")
    s.command(f"MAIL FROM:<{SENDER}>")
    s.command(f"RCPT TO:<{RECIPIENT}>")
    s.command("RSET")
    assert summaries == []


# End to end, through a real upstream.

def test_sent(relay: Relay, upstream: Upstream, certificate: tuple[str, str],
              summaries: list[dict[str, Any]]) -> None:
    bridge = relay(upstream)
    with smtps(bridge, certificate) as client:
        client.sendmail(SENDER, [RECIPIENT], b"Subject: x\r\n\r\nhi\r\n")
    [event] = summaries
    assert event["status"] == "sent"
    assert (event["sender"], event["recipients"], event["login"]) == (SENDER, [RECIPIENT],
                                                                       "device")
    assert (event["account"], event["route"]) == ("default", "default")
    assert event["relay"] == f"localhost:{upstream.port}"
    assert (event["code"], event["dsn"], event["listener"]) == (250, "2.0.0", "smtps")
    text = formatEvent(event)
    assert f"relay=localhost:{upstream.port} " in text and "login=device " in text


def test_sent_names_the_upstream_queue_id(bridge: Any, certificate: tuple[str, str],
                                          summaries: list[dict[str, Any]]) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        client.login("device", PASSWORD)
        client.sendmail(SENDER, [RECIPIENT], b"Subject: x\r\n\r\nhi\r\n")
    # The demo upstream is a session of the bridge's own: it logs its line too.
    [event] = [event for event in summaries if event["listener"] == "smtps"]
    assert event["status"] == "sent" and event["queue_id"]
    assert event["queue_id"] in event["reply"]


@pytest.mark.parametrize("reply, status", [("554 5.7.1 Spam, go away", "refused"),
                                           ("451 4.3.0 Busy, try later", "deferred")])
def test_refused_and_deferred_at_the_end_of_data(relay: Relay, upstream_factory: Start,
                                                 certificate: tuple[str, str],
                                                 summaries: list[dict[str, Any]],
                                                 reply: str, status: str) -> None:
    server = upstream_factory(data_reply=reply)
    bridge = relay(server)
    with smtps(bridge, certificate) as client, pytest.raises(smtplib.SMTPDataError):
        client.sendmail(SENDER, [RECIPIENT], b"Subject: x\r\n\r\nhi\r\n")
    [event] = summaries
    assert (event["status"], event["code"]) == (status, int(reply[:3]))
    assert event["relay"] == f"localhost:{server.port}"
    assert reply[4:] in event["reply"]


def test_deferred_when_the_upstream_is_down(relay: Relay, upstream: Upstream,
                                            summaries: list[dict[str, Any]],
                                            logged: list[str]) -> None:
    port = closed_port()
    bridge = relay(upstream, host="127.0.0.1", port=port)
    [line] = reply_to_mail(bridge)
    [event] = summaries
    assert (event["status"], event["code"], event["relay"]) == ("deferred", 451, None)
    assert f"127.0.0.1:{port}" in event["reply"] and "unreachable" in event["reply"]
    assert (event["account"], event["route"], event["recipients"]) == ("default", "default", [])
    # The failure carries the device's session id, so it can be matched to the device.
    session = event["session"]
    assert f"{session} connect from [127.0.0.1]" in "\n".join(logged)
    assert formatEvent(event).startswith(f"{session} status=deferred ")


def test_no_secret_in_any_summary(relay: Relay, upstream: Upstream,
                                  certificate: tuple[str, str],
                                  summaries: list[dict[str, Any]]) -> None:
    bridge = relay(upstream)
    with smtps(bridge, certificate) as client:
        client.sendmail(SENDER, [RECIPIENT], b"Subject: x\r\n\r\nhi\r\n")
    text = repr(summaries) + "".join(formatEvent(event) or "" for event in summaries)
    for secret in (PASSWORD, UPSTREAM_PASSWORD, upstream.password):
        assert secret not in text
