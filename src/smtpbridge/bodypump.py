"""Streams a spooled message into an upstream session at the pace the upstream takes it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from smtpbridge.interfaces import IUpstreamSession


@implementer(IPushProducer)
class BodyPump:
    """The producer of a spooled message's body: give it to the session's C{data()}, then
    L{run} writes the lines batch by batch (64 KiB), pausing whenever the upstream's
    transport says its buffer is full, and yielding to the reactor between batches."""

    def __init__(self, data: BinaryIO, session: IUpstreamSession, clock: Any) -> None:
        self._batches = message_lines(data)
        self._session = session
        self._clock = clock
        self._paused = False
        self._stopped = False
        self._done: Deferred[None] | None = None

    def run(self) -> Deferred[None]:
        """Write the whole body; fires once every line is written (or the upstream is gone)."""
        self._done = Deferred()
        self._clock.callLater(0, self._step)
        return self._done

    def _step(self) -> None:
        if self._paused or self._done is None or self._done.called:
            return
        if self._stopped:
            self._finish()
            return
        batch = next(self._batches, None)
        if batch is None:
            self._finish()
            return
        self._session.write_lines(batch)
        self._clock.callLater(0, self._step)

    def _finish(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done.callback(None)

    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        if self._paused:
            self._paused = False
            self._clock.callLater(0, self._step)

    def stopProducing(self) -> None:  # noqa: N802
        self._stopped = True
        self.resumeProducing()


def message_lines(f: BinaryIO, chunk: int = 64 * 1024) -> Iterator[list[bytes]]:
    """A spooled message's lines, without their CRLF, in batches of about C{chunk} bytes."""
    rest = b""
    while True:
        data = f.read(chunk)
        if not data:
            break
        data = rest + data
        cut = data.rfind(b"\r\n")
        if cut < 0:
            rest = data
            continue
        rest = data[cut + 2:]
        yield data[:cut].split(b"\r\n")
    if rest:
        yield [rest]
