"""The client's body is paused for its own transaction only: a pause from the upstream
that comes after the final dot (the rest of the message leaving in one large write) must
not hold the session's next command, nor stop its idle deadline for good."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport

from smtpbridge.client import UpstreamProtocol
from smtpbridge.earlybody import LIMIT as EARLY_LIMIT
from smtpbridge.mapping import StaticMapper
from smtpbridge.model import Assignment, Route, UpstreamAccount
from smtpbridge.relay import InlineDelivery
from smtpbridge.secret import Secret
from smtpbridge.upstreamsession import UpstreamSession
from tests.test_server import Session

ROUTE = Route("smtp.example.com", 587)
PLAIN = UpstreamAccount("relay@example.com", Secret("pw"))
REWRITING = UpstreamAccount("relay@example.com", Secret("pw"), rewrite_sender="relay@example.com")


class TCPLikeTransport(StringTransport):
    """As Twisted's TCP transport: beyond 64 KiB not yet sent, the registered streaming
    producer is paused at once, inside the write; it is resumed once all has left."""

    bufferSize = 2 ** 16

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > self.bufferSize:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.clear()
        if self.producer is not None and self.streaming:
            self.producer.resumeProducing()


class OneUpstream:
    """The connector: one real upstream protocol over L{TCPLikeTransport}."""

    def __init__(self, clock: Any) -> None:
        self.transport = TCPLikeTransport()
        self.protocol = UpstreamProtocol(ROUTE, clock)
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"220 upstream\r\n")
        self.transport.clear()

    def connect(self, route: Route, account: UpstreamAccount | None) -> Deferred[UpstreamSession]:
        return succeed(UpstreamSession(self.protocol, {"8BITMIME": "", "SIZE": ""}))

    def answer(self, line: bytes) -> None:
        self.protocol.dataReceived(line)


def to_data(account: UpstreamAccount) -> tuple[Session, OneUpstream]:
    s = Session()
    upstream = OneUpstream(s.clock)
    s.factory.delivery = InlineDelivery(StaticMapper(Assignment((ROUTE,), account)), upstream)
    s.command("EHLO printer")
    s.send("MAIL FROM:<a@example.com>\r\n")
    upstream.answer(b"250 ok\r\n")
    s.send("RCPT TO:<b@example.com>\r\n")
    upstream.answer(b"250 ok\r\n")
    assert s.codes() == ["250", "250"]
    s.send("DATA\r\n")
    assert s.codes() == ["354"]  # the bridge's own, before the upstream's
    return s, upstream


def assert_session_goes_on(s: Session) -> None:
    assert not s.protocol.holds
    assert s.protocol.idle.running
    assert s.command("NOOP")[0].startswith("250")
    assert s.command("QUIT")[0].startswith("221")


def test_a_header_released_at_the_dot_pauses_the_upstream_and_not_the_next_command() -> None:
    """The sender rewrite holds the header until it ends; a message that is all header
    leaves at the final dot, in one write of over 64 KiB."""
    s, upstream = to_data(REWRITING)
    upstream.answer(b"354 go on\r\n")
    header = b"".join(b"X-Filler-%04d: %s\r\n" % (n, b"v" * 60) for n in range(1000))
    s.send(b"From: <a@example.com>\r\n" + header + b".\r\n")
    assert len(upstream.transport.value()) > TCPLikeTransport.bufferSize
    upstream.transport.drain()
    upstream.answer(b"250 2.0.0 accepted\r\n")
    assert s.codes() == ["250"]
    assert_session_goes_on(s)


def test_a_body_held_for_the_upstreams_354_pauses_the_upstream_and_not_the_next_command() -> None:
    """The whole message and its dot came before the upstream's 354, just under the
    held bound; dot-stuffing makes it more than 64 KiB on its way upstream."""
    line = b".." + b"x" * 60 + b"\r\n"  # a line that starts with ".", stuffed both ways
    count = EARLY_LIMIT // (len(line) - 1) - 5
    assert count * (len(line) - 1) < EARLY_LIMIT < count * len(line)  # held, then sent
    s, upstream = to_data(PLAIN)
    s.send(line * count + b".\r\n")
    upstream.transport.clear()
    upstream.answer(b"354 go on\r\n")
    assert len(upstream.transport.value()) > TCPLikeTransport.bufferSize
    upstream.transport.drain()
    upstream.answer(b"250 2.0.0 accepted\r\n")
    assert s.codes() == ["250"]
    assert_session_goes_on(s)
