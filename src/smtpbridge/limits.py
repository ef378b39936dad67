"""Process-wide limits: the file-descriptor budget of the listeners, the bounded
thread pool of the password checks, and semaphore tokens given back without nesting.

Every connection costs a descriptor, and an in-line transaction a second one upstream.
When the process nears its limit, the listeners stop accepting (their ports pause, new
clients wait in the kernel's listen queue) instead of failing every accept and every
upstream connect with EMFILE; they resume once enough connections have closed.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from smtpbridge.errors import SMTPReplyError
from smtpbridge.replies import AUTH_BUSY

T = TypeVar("T")

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


class BoundedThreadPool(Service):
    """A thread pool of its own, for the password checks (scrypt holds 32 MiB and about
    100 ms of CPU each), apart from the reactor's pool that resolves upstream host names.

    At most C{threads} checks run and C{queue} wait; more are refused at once with
    454 4.7.0, so a guessing storm costs a bounded amount of memory and never delays
    name resolution.
    """

    def __init__(self, reactor: Any, threads: int, queue: int, name: str,
                 busy: Exception | None = None) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(threads, threads, name)
        self._limit = threads + queue
        self._refusal = busy if busy is not None else SMTPReplyError(AUTH_BUSY)
        self.busy = 0

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._pool.start()

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self._pool.stop()

    def run(self, function: Callable[..., T], *args: object) -> Deferred[T]:
        """C{function(*args)} in a thread of the pool; fails at once (by default with the
        454 for AUTH) when it is full."""
        if self.busy >= self._limit:
            return fail(self._refusal)
        self.busy += 1

        def done(result: T | Failure) -> T | Failure:
            self.busy -= 1
            return result

        return deferToThreadPool(self._reactor, self._pool, function, *args).addBoth(done)


class FlatRelease:
    """Gives a L{DeferredSemaphore}'s token back without nesting.

    C{release()} runs the next waiter inside it.  A waiter that gives its token back at
    once (its host was found down meanwhile, its message held) releases inside that,
    one call deeper for each, until a RecursionError strands a token for good.  So a
    release made inside another is made a turn later (C{clock.callLater(0, ...)}).
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._inside = False

    def __call__(self, semaphore: DeferredSemaphore) -> None:
        if self._inside:
            self._clock.callLater(0, self, semaphore)
            return
        self._inside = True
        try:
            semaphore.release()
        finally:
            self._inside = False
