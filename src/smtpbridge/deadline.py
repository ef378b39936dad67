"""A restartable deadline on a clock: the one timer pattern both SMTP sides use."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """Calls C{expired} once C{seconds} pass without a restart; stopped, it does nothing.

    A restart only moves the due time: the timer, when it goes off early, sets itself
    again for the rest.  Restarting on every line then costs no timer of its own, nor
    does a L{pause} and a restart.
    """

    def __init__(self, clock: IReactorTime, seconds: float, expired: Callable[[], object]) -> None:
        self._clock = clock
        self.seconds = seconds
        self._expired = expired
        self._call: IDelayedCall | None = None
        self._due = 0.0
        self._paused = False

    @property
    def running(self) -> bool:
        return self._set and not self._paused

    @property
    def _set(self) -> bool:
        return self._call is not None and self._call.active()

    def start(self) -> None:
        """(Re)start: C{seconds} from now."""
        self._due = self._clock.seconds() + self.seconds
        self._paused = False
        if not self._set:
            self._call = self._clock.callLater(self.seconds, self._fire)

    def ensure(self) -> None:
        """Start unless it is already running (then it keeps its time)."""
        if not self.running:
            self.start()

    def pause(self) -> None:
        """Stop for a while: it does not fire, but its timer stays set until it is due,
        so that a start before then costs none (the idle deadline pauses for every
        command relayed upstream).  L{stop} takes the timer away at once."""
        self._paused = True

    def stop(self) -> None:
        call, self._call, self._paused = self._call, None, False
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        self._call = None
        if self._paused:
            return
        left = self._due - self._clock.seconds()
        if left > 0:  # restarted meanwhile
            self._call = self._clock.callLater(left, self._fire)
            return
        self._expired()
