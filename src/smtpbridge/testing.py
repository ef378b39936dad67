"""Fakes for tests of code that uses the bridge's interfaces.

They keep the real implementations' contract (the contract tests in ``tests/`` run against
both): L{MemoryDelivery} an L{IDelivery}, L{FakeUpstream} an L{IUpstreamConnector}.
"""

from __future__ import annotations

from collections.abc import Sequence

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from smtpbridge.fakeupstream import (
    QUEUED,
    UPSTREAM_FEATURES,
    FakeUpstream,
    FakeUpstreamSession,
    UpstreamMessage,
    login_rejected,
    unreachable,
)
from smtpbridge.interfaces import IDelivery, ITransaction, Params
from smtpbridge.model import ClientInfo, Reply
from smtpbridge.replies import RECIPIENT_OK, SENDER_OK, START_DATA

__all__ = ["QUEUED", "RECIPIENT_OK", "SENDER_OK", "START_DATA", "UPSTREAM_FEATURES",
           "FakeUpstream", "FakeUpstreamSession", "MemoryDelivery", "MemoryTransaction",
           "StoredMessage", "UpstreamMessage", "login_rejected", "unreachable"]


@attr.define
class StoredMessage:
    """One message L{MemoryDelivery} accepted, with its envelope."""

    client: ClientInfo
    sender: str
    sender_params: dict[str, str | None]
    recipients: list[str]
    data: bytes


@implementer(ITransaction)
class MemoryTransaction:
    """A transaction that keeps its message in memory."""

    def __init__(self, delivery: MemoryDelivery, client: ClientInfo) -> None:
        self._delivery = delivery
        self.client = client
        self.sender: str | None = None
        self.sender_params: dict[str, str | None] = {}
        self.recipients: list[str] = []
        self.chunks: list[bytes] = []
        self.producer: IPushProducer | None = None
        self.aborted = False
        self.finished = False

    def _answer(self, step: str, reply: Reply) -> Deferred[Reply]:
        reply = self._delivery.replies.get(step, reply)
        if not self._delivery.hold_replies:
            return succeed(reply)
        d: Deferred[Reply] = Deferred()
        self._delivery.waiting.append((d, reply))
        return d

    def mail(self, sender: str, params: Params) -> Deferred[Reply]:
        self.sender, self.sender_params = sender, dict(params)
        return self._answer("mail", SENDER_OK)

    def rcpt(self, recipient: str, params: Params) -> Deferred[Reply]:
        reply = self._delivery.refused_recipients.get(recipient, RECIPIENT_OK)
        if reply.positive:
            self.recipients.append(recipient)
        return self._answer(f"rcpt:{recipient}", reply)

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        self.producer = producer
        return self._answer("data", START_DATA)

    def write(self, lines: Sequence[bytes]) -> None:
        assert not (self.aborted or self.finished), "write after the end of the transaction"
        self.chunks.append(b"".join(line + b"\r\n" for line in lines))

    def finish(self) -> Deferred[Reply]:
        assert not self.aborted, "finish after abort"
        self.finished = True
        reply = self._delivery.replies.get("finish", QUEUED)
        if reply.positive:
            self._delivery.messages.append(StoredMessage(
                self.client, self.sender or "", self.sender_params, list(self.recipients),
                b"".join(self.chunks)))
        return self._answer("finish", reply)

    def abort(self) -> None:
        self.aborted = True


@implementer(IDelivery)
class MemoryDelivery:
    """Records transactions and messages; replies can be changed or held back.

    ``replies`` maps a step (``"mail"``, ``"rcpt:<address>"``, ``"data"``,
    ``"finish"``) to the reply to give instead of the positive one.  With
    ``hold_replies``, every reply waits in ``waiting`` until L{release_all}.
    """

    def __init__(self) -> None:
        self.transactions: list[MemoryTransaction] = []
        self.messages: list[StoredMessage] = []
        self.replies: dict[str, Reply] = {}
        self.refused_recipients: dict[str, Reply] = {}
        self.hold_replies = False
        self.waiting: list[tuple[Deferred[Reply], Reply]] = []

    def transaction(self, client: ClientInfo) -> MemoryTransaction:
        transaction = MemoryTransaction(self, client)
        self.transactions.append(transaction)
        return transaction

    def release_all(self) -> None:
        """Fire every held reply, oldest first."""
        while self.waiting:
            d, reply = self.waiting.pop(0)
            d.callback(reply)
