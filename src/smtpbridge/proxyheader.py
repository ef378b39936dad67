"""Listeners behind HAProxy: the PROXY protocol header (v1 or v2) comes first.

Twisted's own ``haproxy:`` endpoint hands the connection to the protocol at once and
reads the header later, but SMTP speaks first: the greeting would go out, and the
session would log, count and trust HAProxy's address instead of the device's.  Here the
session starts only once the header is read, so the real client address is what
C{trusted_networks}, the AUTH throttle, the connection and rate limits, the log and the
``Received:`` header see.  A connection without a valid header is dropped without a
word; one that sends nothing is dropped after C{timeout} seconds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

log = Logger()


@implementer(IHandshakeListener)
class ProxyHeaderProtocol(HAProxyProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped protocol (and tells it when a
    STARTTLS handshake is done: Twisted tells the protocol on top of the connection)."""

    factory: ProxyHeaderFactory
    _deadline: IDelayedCall | None = None
    _started = False
    _buffer = b""

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._deadline = self.factory.clock.callLater(self.factory.timeout, self._too_slow)

    def handshakeCompleted(self) -> None:  # noqa: N802
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        data, self._buffer = self._buffer, b""
        parser = self._parser
        if parser is None:
            if len(data) < 16 and (V2Parser.PREFIX.startswith(data[:12])
                                   or V1Parser.PROXYSTR.startswith(data[:5])):
                self._buffer = data  # too little yet to tell
                return
            if data[:12] == V2Parser.PREFIX and data[12] & 0xF0 == 0x20:
                self._parser = parser = V2Parser()
            elif data[:5] == V1Parser.PROXYSTR:
                self._parser = parser = V1Parser()
            else:
                self._refuse("no PROXY protocol header")
                return
        try:
            self._proxyInfo, remaining = parser.feed(data)
        except InvalidProxyHeader:
            self._refuse("invalid PROXY protocol header")
            return
        if self._proxyInfo is None:
            return
        self._stop_deadline()
        self._started = True
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def _refuse(self, why: str) -> None:
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info("connection from [{host}] dropped: {why}", host=getattr(peer, "host", peer),
                 why=why)
        self._stop_deadline()
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _too_slow(self) -> None:
        self._deadline = None
        self._refuse(f"no PROXY protocol header within {self.factory.timeout:g} s")

    def _stop_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._stop_deadline()
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class ProxyHeaderFactory(WrappingFactory):
    """Wraps a listener's factory: every connection starts with a PROXY header."""

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrapped: Any, clock: IReactorTime, timeout: float) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.timeout = timeout

    def logPrefix(self) -> str:  # noqa: N802
        prefix: str = getattr(self.wrappedFactory, "logPrefix", lambda: "")()
        return f"{prefix} (PROXY)"
