"""The bounds of the code flow's loopback redirect server (``oauth-login``): how many
connections it takes at once, how much of a request body it keeps, how long it lets a
connection stay silent.  Each holds while the browser's redirect still gets through."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smtpbridge.oauthflows import (
    REDIRECT_BODY,
    REDIRECT_CONNECTIONS,
    REDIRECT_IDLE,
    RedirectResource,
    redirect_factory,
)

STATE = "s" * 32
REDIRECT = f"GET /?code=the-code&state={STATE} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


class Server:
    def __init__(self) -> None:
        self.clock = Clock()
        self.resource = RedirectResource(self.clock, STATE, [])
        self.factory = redirect_factory(self.clock, self.resource)
        self.port = 40000

    def connect(self) -> tuple[Any, StringTransport] | None:
        """A new connection from the browser; None when it was refused."""
        self.port += 1
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", self.port))
        if protocol is None:
            return None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def redirect(self) -> bytes:
        """The browser's redirect on a new connection: the page it gets."""
        connection = self.connect()
        assert connection is not None
        protocol, transport = connection
        protocol.dataReceived(REDIRECT)
        self.clock.advance(0)
        return transport.value()


def test_connections_beyond_the_limit_are_refused() -> None:
    server = Server()
    held = [server.connect() for _ in range(REDIRECT_CONNECTIONS)]
    assert all(connection is not None for connection in held)
    assert server.connect() is None  # closed at once
    protocol, _ = held.pop()  # type: ignore[misc]
    protocol.connectionLost(None)
    assert server.redirect().startswith(b"HTTP/1.1 200 ")
    assert server.resource.code.called


def test_a_body_beyond_the_limit_drops_the_connection() -> None:
    server = Server()
    connection = server.connect()
    assert connection is not None
    protocol, transport = connection
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: 100000000\r\n\r\n")
    protocol.dataReceived(b"x" * REDIRECT_BODY)  # up to the limit: kept
    assert not transport.disconnecting
    protocol.dataReceived(b"x")
    assert transport.disconnecting  # (aborted: nothing more is read)
    assert server.redirect().startswith(b"HTTP/1.1 200 ")


def test_a_silent_connection_is_closed() -> None:
    server = Server()
    connection = server.connect()
    assert connection is not None
    _, transport = connection
    server.clock.advance(REDIRECT_IDLE - 1)
    assert not transport.disconnecting
    server.clock.advance(1)
    assert transport.disconnecting
