"""A restartable deadline on a clock: the one timer pattern both SMTP sides use."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """Calls C{expired} once C{seconds} pass without a restart; stopped, it does nothing.

    A restart only moves the due time: the timer, when it goes off early, sets itself
    again for the rest.  Restarting on every line then costs no timer of its own.
    """

    def __init__(self, clock: IReactorTime, seconds: float, expired: Callable[[], object]) -> None:
        self._clock = clock
        self.seconds = seconds
        self._expired = expired
        self._call: IDelayedCall | None = None
        self._due = 0.0

    @property
    def running(self) -> bool:
        return self._call is not None and self._call.active()

    def start(self) -> None:
        """(Re)start: C{seconds} from now."""
        self._due = self._clock.seconds() + self.seconds
        if not self.running:
            self._call = self._clock.callLater(self.seconds, self._fire)

    def ensure(self) -> None:
        """Start unless it is already running (then it keeps its time)."""
        if not self.running:
            self.start()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        left = self._due - self._clock.seconds()
        if left > 0:  # restarted meanwhile
            self._call = self._clock.callLater(left, self._fire)
            return
        self._expired()
