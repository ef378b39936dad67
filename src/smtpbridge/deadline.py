"""A restartable deadline on a clock: the one timer pattern both SMTP sides use."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """Calls C{expired} once C{seconds} pass without a restart; stopped, it does nothing."""

    def __init__(self, clock: IReactorTime, seconds: float, expired: Callable[[], object]) -> None:
        self._clock = clock
        self.seconds = seconds
        self._expired = expired
        self._call: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        return self._call is not None and self._call.active()

    def start(self) -> None:
        """(Re)start: C{seconds} from now."""
        self.stop()
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
        self._expired()
