"""The start of a message body while the upstream's 354 is on its way.

Once DATA has gone upstream (the recipients are accepted by then), the bridge answers
the client with its own 354 at once instead of a round trip later: the client's first
lines then travel while the upstream answers.  Lines that come before the upstream's
354 wait here, up to L{LIMIT} bytes; beyond that the client is paused until the answer
comes.  If the upstream refuses DATA instead, the lines are dropped, and the client's
final dot gets the refusal (or, when the spool can keep the message, the spool's 250).
The verdict on the message is still the upstream's, or the spool's.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from smtpbridge.interfaces import IUpstreamSession

#: Bytes of body kept while the upstream's 354 has not come.
LIMIT = 64 * 1024


class _Pauses:
    """The client's body producer, paused for one reason or more (the upstream's
    back-pressure, the wait for its 354): it goes on when no reason is left."""

    def __init__(self, producer: IPushProducer) -> None:
        self.producer = producer
        self._reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self._reasons:
            self.producer.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons:
                self.producer.resumeProducing()


@implementer(IPushProducer)
class _UpstreamPace:
    """The client's body producer as the upstream session sees it."""

    def __init__(self, pauses: _Pauses) -> None:
        self._pauses = pauses

    def pauseProducing(self) -> None:  # noqa: N802
        self._pauses.pause("upstream")

    def resumeProducing(self) -> None:  # noqa: N802
        self._pauses.resume("upstream")

    def stopProducing(self) -> None:  # noqa: N802
        self._pauses.producer.stopProducing()


class EarlyBody:
    """Body lines (unstuffed, without line endings) for C{session}: held until its 354,
    then passed straight on.  C{producer} is the client's body; the session is to be
    given L{producer} instead, so that its pauses and this one's do not undo each other."""

    def __init__(self, session: IUpstreamSession, producer: IPushProducer,
                 limit: int = LIMIT) -> None:
        self._session = session
        self._pauses = _Pauses(producer)
        self.producer: IPushProducer = _UpstreamPace(self._pauses)
        self._limit = limit
        self._lines: list[bytes] | None = []  # None: passed straight on (or dropped)
        self._size = 0
        self._dropped = False

    def write(self, lines: Sequence[bytes]) -> None:
        if self._lines is None:
            if not self._dropped and lines:
                self._session.write_lines(lines)
            return
        self._lines.extend(lines)
        self._size += sum(map(len, lines)) + 2 * len(lines)
        if self._size > self._limit:
            self._pauses.pause("early")

    def send(self) -> None:
        """The upstream said 354: what was held goes to it, and what comes next follows
        (letting the client go on may bring its next lines at once)."""
        lines, self._lines = self._lines or [], None
        if lines:
            self._session.write_lines(lines)
        self._pauses.resume("early")

    def drop(self) -> None:
        """Forget what was held and what comes next, and let the client go on."""
        self._lines, self._dropped = None, True
        self._pauses.resume("early")
