"""Services that keep the listeners running: the listening endpoints, and the reload of
their certificates on SIGHUP."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorFromThreads,
    IStreamServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpbridge.errors import ConfigError
from smtpbridge.limits import ConnectionGovernor
from smtpbridge.tls import ServerTLS

log = Logger()


class ListenerService(Service):
    """Listens on one endpoint; a port that cannot be bound stops the start in one line."""

    def __init__(self, name: str, description: str, endpoint: IStreamServerEndpoint,
                 factory: IProtocolFactory, governor: ConnectionGovernor | None = None) -> None:
        self.name = name
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.governor = governor
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        outcome: list[IListeningPort | Failure] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            message = f"cannot listen on {self.description}: {outcome[0].getErrorMessage()}"
            log.critical("{message}", message=message)
            # twistd has already pointed sys.stderr at the log; the terminal needs it too.
            (sys.__stderr__ or sys.stderr).write(f"smtpbridge: {message}\n")
            raise SystemExit(1)
        if not outcome or isinstance(outcome[0], Failure):
            raise RuntimeError(f"{self.description}: the endpoint did not listen at once")
        self.port = port = outcome[0]
        if self.governor is not None:
            self.governor.add_port(port)
        address = port.getHost()
        log.info("{name} listening on {host}:{port}", name=self.name,
                 host=getattr(address, "host", address), port=getattr(address, "port", ""))

    def startService(self) -> None:  # noqa: N802
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> object:  # noqa: N802
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class CertificateReloader(Service):
    """Reloads every listener's certificate and key on SIGHUP.

    New connections use the new files at once; connections already open keep the
    certificate they started with.  Files that do not load leave the old ones in use.
    """

    def __init__(self, reactor: IReactorFromThreads,
                 contexts: list[tuple[ServerTLS, Callable[[], SSL.Context]]]) -> None:
        self._reactor = reactor
        self._contexts = contexts
        self._previous: signal.Handlers | int | Callable[..., Any] | None = None

    def reload(self) -> bool:
        """Load every certificate again; False (and nothing changed) if one fails."""
        try:
            fresh = [(tls, build()) for tls, build in self._contexts]
        except ConfigError as e:
            log.error("certificates not reloaded, the old ones stay in use: {error}",
                      error=str(e))
            return False
        for tls, context in fresh:
            tls.context = context
        log.info("certificates reloaded for {count} TLS context(s)", count=len(fresh))
        return True

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(
                signal.SIGHUP, lambda signum, frame: self._reactor.callFromThread(self.reload))

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None


class Sessions(Protocol):
    """A listener's factory, as a stop sees it: its open sessions (each with drain() and
    abort(why))."""

    sessions: set[Any]


class BridgeService(MultiService):
    """The whole bridge.  A stop (SIGTERM) first stops accepting, then lets the open
    transactions finish for C{drain_timeout} seconds (idle sessions are closed with 421
    at once, busy ones after their transaction), aborts what is still open (a client
    that had no 250 yet: nothing is lost, the spool keeps what it acknowledged), and
    only then stops the rest: the spool's runner, the thread pools."""

    def __init__(self, clock: Any, drain_timeout: float) -> None:
        super().__init__()
        self._clock = clock
        self.drain_timeout = drain_timeout
        self.listeners: list[Sessions] = []  # the factories whose sessions are drained

    def stopService(self) -> Deferred[None]:  # noqa: N802
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        accepting = [child for child in self if isinstance(child, ListenerService)]
        for child in accepting:
            await maybeDeferred(child.stopService)
        open_sessions = [s for factory in self.listeners for s in list(factory.sessions)]
        if open_sessions:
            log.info("stopping: {count} open session(s) get {seconds:g} s to finish",
                     count=len(open_sessions), seconds=self.drain_timeout)
        for session in open_sessions:
            session.drain()
        deadline = self._clock.seconds() + self.drain_timeout
        while any(factory.sessions for factory in self.listeners) and \
                self._clock.seconds() < deadline:
            await deferLater(self._clock, 0.1)
        for factory in self.listeners:
            for session in list(factory.sessions):
                session.abort("the bridge is stopping")
        for child in reversed(list(self)):
            if child not in accepting:
                await maybeDeferred(child.stopService)
