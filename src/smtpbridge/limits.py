"""Process-wide limits: the file-descriptor budget of the listeners.

Every connection costs a descriptor, and an in-line transaction a second one upstream.
When the process nears its limit, the listeners stop accepting (their ports pause, new
clients wait in the kernel's listen queue) instead of failing every accept and every
upstream connect with EMFILE; they resume once enough connections have closed.
"""

from __future__ import annotations

import resource
from typing import Protocol

from twisted.logger import Logger

log = Logger()

#: Descriptors kept free for everything that is not a client: logs, the spool, the
#: token endpoint, upstream sessions of the pool.
RESERVE = 64


class Pausable(Protocol):
    """A listening port that can stop and start accepting."""

    def stopReading(self) -> None: ...  # noqa: N802
    def startReading(self) -> None: ...  # noqa: N802


def raise_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the (soft, hard) limits now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open-file limit from {soft} to {hard}: {error}",
                     soft=soft, hard=hard, error=e)
    return soft, hard


class ConnectionGovernor:
    """Counts client connections over all listeners and pauses every port when the next
    ones could run the process out of descriptors.

    Each client may need two descriptors (itself and its upstream session), so the
    ports pause at C{(limit - RESERVE) / 2} connections and resume 10% below that.
    """

    def __init__(self, file_limit: int) -> None:
        self.high = max(1, (file_limit - RESERVE) // 2)
        self.low = max(0, self.high - max(1, self.high // 10))
        self.open = 0
        self.paused = False
        self._ports: list[Pausable] = []

    def add_port(self, port: object) -> None:
        """A listening port to pause and resume (ports that cannot pause are ignored)."""
        if hasattr(port, "stopReading") and hasattr(port, "startReading"):
            self._ports.append(port)
            if self.paused:
                port.stopReading()

    def opened(self) -> None:
        self.open += 1
        if not self.paused and self.open >= self.high:
            self.paused = True
            log.warn("{open} client connections, near the open-file limit: listeners "
                     "paused", open=self.open)
            for port in self._ports:
                port.stopReading()

    def closed(self) -> None:
        self.open -= 1
        if self.paused and self.open <= self.low:
            self.paused = False
            log.info("{open} client connections: listeners accept again", open=self.open)
            for port in self._ports:
                port.startReading()
