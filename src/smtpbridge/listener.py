"""Services that keep the listeners running: the listening endpoints (or, in a worker
process, the listening sockets its supervisor holds), the reload of their certificates
on SIGHUP, and the heap frozen once the bridge has started."""

from __future__ import annotations

import gc
import signal
import socket
import sys
import threading
from collections.abc import Callable, Container, Sequence
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorFromThreads,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.errors import ConfigError
from smtpbridge.limits import ConnectionGovernor
from smtpbridge.tls import ServerTLS

log = Logger()


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """A listening socket another process opened and handed down as descriptor C{fd}: a
    worker accepts on the sockets of its supervisor (C{IReactorSocket.adoptStreamPort})."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        probe = socket.socket(fileno=self._fd)  # reads the address family of the socket
        family = probe.family
        probe.detach()
        port: IListeningPort = self._reactor.adoptStreamPort(self._fd, family, protocolFactory)
        return succeed(port)


def adopted_endpoint(reactor: Any, fd: int, description: str) -> IStreamServerEndpoint:
    """The endpoint of a listener whose socket is descriptor C{fd}; C{description}, its
    configured endpoint string, says whether the PROXY protocol comes first."""
    endpoint: IStreamServerEndpoint = AdoptedEndpoint(reactor, fd)
    if description.startswith("haproxy:"):
        endpoint = proxyEndpoint(endpoint)
    return endpoint


#: The service name of the admin listener's readiness probe, which the supervisor of
#: workers keeps beside the listeners (see L{smtpbridge.workers}).
READINESS = "readiness"


class ImplicitTLSFactory(TLSMemoryBIOFactory):
    """TLS from the first byte (port 465).  Each write becomes its TLS record at once:
    Twisted's default TLS transport holds small writes until the next turn of the
    reactor, to gather them, but a session's replies are gathered already (those to one
    read leave in one write), so the wait only cost a timer and a turn per reply."""

    protocol = TLSMemoryBIOProtocol


@implementer(IProtocolFactory)
class SheddingFactory:
    """Closes a connection from an address C{shed(host)} names at once, before any TLS or
    SMTP object is made for it (L{AuthThrottle.shedding}: one refused AUTH a moment ago,
    in a guessing storm), unless it is in C{exempt} (the trusted networks, whose devices
    keep their connections); passes every other to C{factory}."""

    def __init__(self, factory: IProtocolFactory, shed: Callable[[str], bool],
                 exempt: Container[str] = ()) -> None:
        self._factory = factory
        self._shed = shed
        self._exempt = exempt
        self.shed = 0  # connections closed so far

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        host = getattr(addr, "host", None)
        if isinstance(host, str) and self._shed(host) and host not in self._exempt:
            self.shed += 1
            return None  # the port closes the socket
        return self._factory.buildProtocol(addr)

    def doStart(self) -> None:  # noqa: N802
        self._factory.doStart()

    def doStop(self) -> None:  # noqa: N802
        self._factory.doStop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)


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
    Each of C{also} is called first on every reload: the upstream side forgets its TLS
    options (the CA bundles may have changed) and its idle sessions.
    """

    def __init__(self, reactor: IReactorFromThreads,
                 contexts: list[tuple[ServerTLS, Callable[[], SSL.Context]]],
                 also: Sequence[Callable[[], object]] = ()) -> None:
        self._reactor = reactor
        self._contexts = contexts
        self._also = tuple(also)
        self._previous: signal.Handlers | int | Callable[..., Any] | None = None

    def reload(self) -> bool:
        """Load every certificate again; False (and nothing changed) if one fails."""
        for call in self._also:
            try:
                call()
            except Exception:
                log.failure("reload of {call!r} failed", call=call)
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


class StopHook(Service):
    """Runs C{stop()} when the bridge stops and waits for what it returns, at most
    C{grace} seconds: kept upstream sessions say QUIT."""

    def __init__(self, stop: Callable[[], Deferred[None]], clock: IReactorTime,
                 grace: float = 5.0) -> None:
        self._stop = stop
        self._clock = clock
        self._grace = grace

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        done = self._stop()
        done.addTimeout(self._grace, self._clock)
        return done.addErrback(lambda failure: None)


class HeapFreezer(Service):
    """Moves every object alive once the bridge has started (modules, configuration, TLS
    contexts) out of the garbage collector's sight with C{gc.freeze()}: they live as
    long as the process, and the collector no longer walks them again and again while
    sessions come and go."""

    def startService(self) -> None:  # noqa: N802
        super().startService()
        gc.collect()
        gc.freeze()
        log.info("{count} start-up objects frozen out of garbage collection",
                 count=gc.get_freeze_count())
