"""Line framing shared by the downstream and upstream SMTP state machines.

On top of Twisted's ``LineReceiver`` it adds what SMTP peers in the field need:
a bare LF ends a line as CRLF does, an over-long line is reported and skipped
instead of dropping the connection, and pausing is counted by reason, so that
waiting for a reply and waiting for a slow peer cannot resume each other.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.protocols.basic import LineReceiver


class Connection(Protocol):
    """What the SMTP protocols use of their transport: TCP, maybe under TLS."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...  # noqa: N802
    def abortConnection(self) -> None: ...  # noqa: N802
    def getPeer(self) -> IAddress: ...  # noqa: N802
    def startTLS(self, options: Any) -> None: ...  # noqa: N802
    def getPeerCertificate(self) -> Any: ...  # noqa: N802
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...  # noqa: N802
    def unregisterProducer(self) -> None: ...  # noqa: N802


def no_delay(transport: Any) -> bool:
    """Turn Nagle's algorithm off on the TCP connection beneath C{transport}.

    SMTP is a dialogue of small writes: with Nagle on, the last short segment of a reply
    or of a message waits for the peer's delayed ACK (about 40 ms on Linux).  TLS and
    PROXY-protocol wrappers pass the call on to the TCP transport beneath them.  False
    when there is no TCP connection to set (a UNIX socket, a test transport).
    """
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError, NotImplementedError):
        return False
    return True


class SMTPLineReceiver(LineReceiver):
    """A line receiver for SMTP: CRLF or bare LF, survivable long lines, reasoned pauses."""

    delimiter = b"\n"
    MAX_LENGTH = 4096
    #: Report an over-long line as soon as it is too long, not only once it ends (a
    #: peer that is to be dropped for it may never end it).
    early_too_long = False
    _discarding = False
    _reprocess = False

    def __init__(self) -> None:
        self._holds: set[str] = set()

    # What subclasses implement.

    def line_received(self, line: bytes) -> None:
        """One line, without its CRLF or LF."""
        raise NotImplementedError

    def line_too_long(self) -> None:
        """A line longer than C{MAX_LENGTH} was received and skipped."""
        raise NotImplementedError

    def raw_data_received(self, data: bytes) -> None:
        """Bytes received in raw mode."""
        raise NotImplementedError

    # Pausing by reason.

    def hold(self, reason: str) -> None:
        """Stop handling input (and reading) until C{release(reason)}."""
        if not self._holds:
            self.pauseProducing()
        self._holds.add(reason)

    def release(self, reason: str) -> None:
        """Drop one reason to hold; input flows again when none is left."""
        self._holds.discard(reason)
        if not self._holds and self.paused and self.transport is not None:
            self.resumeProducing()

    @property
    def held(self) -> bool:
        return bool(self._holds)

    @property
    def holds(self) -> frozenset[str]:
        """The reasons input is held for now."""
        return frozenset(self._holds)

    @property
    def connection(self) -> Connection:
        """The transport, typed as what the SMTP protocols use of it."""
        assert self.transport is not None, "not connected"
        return cast(Connection, self.transport)

    # LineReceiver plumbing.

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        super().dataReceived(data)
        while self._reprocess and not self._busyReceiving and not self.paused:
            self._reprocess = False
            super().dataReceived(b"")

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._discarding:
            self._discarding = False
            self.line_too_long()
            return
        self.line_received(line)

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802
        self.raw_data_received(data)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        end = line.find(b"\n")
        if end < 0:
            # The line goes on: skip what came so far, and the rest up to its end.
            self._discarding = True
            if self.early_too_long:
                self.line_too_long()
            return
        self._discarding = False
        self._buffer = line[end + 1:]
        self._reprocess = bool(self._buffer)
        self.line_too_long()
