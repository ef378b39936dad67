"""The admin HTTP listener: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``.

``/healthz`` says the process is alive.  ``/readyz`` says every route can be reached: a
probe (connect, STARTTLS, verify, login, QUIT, through the same connector as the relay)
runs every C{probe_interval} seconds for every route and account the mapper may use, and
the page answers from its last result: 200, or 503 naming the route, the account and the
upstream's failing step.  With a token, everything but ``/healthz`` wants
``Authorization: Bearer <token>`` (compared in constant time).

The pages take no request body: one longer than C{MAX_BODY} bytes (by its Content-Length,
or as a chunked body arrives) is answered 413 and the connection closed, before any of it
is stored.  At most C{MAX_CONNECTIONS} admin connections are open at once, each for at
most C{MAX_CONNECTION_TIME} seconds; further ones are closed as soon as they are accepted.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any

import attr
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from smtpbridge.client import where
from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import IUpstreamConnector
from smtpbridge.listener import READINESS
from smtpbridge.metrics import Metrics
from smtpbridge.model import Assignment
from smtpbridge.secret import Secret

log = Logger()

#: Bytes of request body the admin pages accept (they read none); more is refused.
MAX_BODY = 4096
#: Admin connections open at once; beyond it new connections are closed at once.
MAX_CONNECTIONS = 64
#: Seconds an admin connection may stay open, however it trickles its request (Twisted's
#: idle timeout starts again at every byte); then it is closed.
MAX_CONNECTION_TIME = 60.0

_TOO_LARGE_TEXT = b"the admin pages take no request body\n"
_TOO_LARGE = (b"HTTP/1.1 413 Content Too Large\r\n"
              b"Content-Type: text/plain; charset=utf-8\r\n"
              b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_TOO_LARGE_TEXT)
              + _TOO_LARGE_TEXT)


@attr.frozen
class ProbeTarget:
    """One route and the account that logs in on it (None: the clients' own logins)."""

    route: str
    account: str | None
    assignment: Assignment

    @property
    def label(self) -> str:
        return f"route {self.route} account {self.account or '(none)'}"


def probe_targets(assignments: Sequence[Assignment]) -> list[ProbeTarget]:
    """What the readiness probe tries: each route with each account that uses it."""
    return [ProbeTarget(a.routes[0].name, a.account.name if a.account else None, a)
            for a in assignments]


class ReadinessProbe(TimerService):
    """Logs in on every route every C{interval} seconds and keeps the last result."""

    def __init__(self, interval: float, connector: IUpstreamConnector,
                 targets: Sequence[ProbeTarget], clock: Any,
                 metrics: Metrics | None = None) -> None:
        super().__init__(interval, self.probe)
        self.setName(READINESS)  # the supervisor of workers keeps it by this name
        self.clock = clock
        self._connector = connector
        self._targets = list(targets)
        self._metrics = metrics
        self.results: dict[ProbeTarget, str | None] | None = None  # None: not probed yet
        # What else readiness needs (the supervisor of workers: a worker running): None
        # when it holds, else why not.
        self.also: Callable[[], str | None] = lambda: None

    async def _try(self, target: ProbeTarget) -> str | None:
        """None when one of the route's hosts took the login, else what failed on each."""
        failures = []
        for route in target.assignment.routes:
            try:
                session = await self._connector.connect(route, target.assignment.account)
            except SMTPReplyError as e:
                failures.append(e.reply.text)
                continue
            except Exception as e:  # a bug: named, never shown with its text
                failures.append(f"Upstream {where(route)} probe failed: {type(e).__name__}")
                continue
            await session.quit()
            return None
        return "; ".join(failures)

    def probe(self) -> Deferred[None]:
        """Probe every target at once; the results replace the last ones when all are in."""
        async def one(target: ProbeTarget) -> tuple[ProbeTarget, str | None]:
            return target, await self._try(target)

        def done(outcomes: list[tuple[bool, Any]]) -> None:
            results = dict(value for ok, value in outcomes if ok)
            for target, failure in results.items():
                if failure is not None:
                    log.warn("readiness: {target} fails: {failure}", target=target.label,
                             failure=failure)
                if self._metrics is not None:
                    self._metrics.upstream_ready.labels(
                        target.route, target.account or "").set(failure is None)
            self.results = results

        probes = [Deferred.fromCoroutine(one(target)) for target in self._targets]
        return DeferredList(probes, consumeErrors=True).addCallback(done)

    def status(self) -> tuple[bool, str]:
        """Whether every route can be reached, and the page that says so."""
        missing = self.also()
        if missing is not None:
            return False, f"not ready: {missing}\n"
        if self.results is None:
            return False, "not ready: the upstreams have not been probed yet\n"
        failing = [f"{target.label}: {failure}\n"
                   for target, failure in self.results.items() if failure is not None]
        if failing:
            return False, "not ready\n" + "".join(failing)
        return True, "ready\n" + "".join(f"{target.label}: ok\n" for target in self.results)


class _Text(Resource):
    isLeaf = True

    def __init__(self, code: int, text: str) -> None:
        super().__init__()
        self._code, self._text = code, text

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        request.setResponseCode(self._code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self._code == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="smtpbridge"')
        return self._text.encode("utf-8")


class _Ready(Resource):
    isLeaf = True

    def __init__(self, probe: ReadinessProbe) -> None:
        super().__init__()
        self._probe = probe

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        ready, text = self._probe.status()
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return text.encode("utf-8")


class _Metrics(Resource):
    """prometheus_client's own Twisted resource, with the state figures read first."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        from prometheus_client.twisted import MetricsResource

        self._metrics = metrics
        self._resource = MetricsResource(metrics.registry)

    def render(self, request: Request) -> Any:
        self._metrics.refresh()
        return self._resource.render(request)


class _Root(Resource):
    """The pages; all but /healthz behind the token when there is one."""

    def __init__(self, token: Secret | None) -> None:
        super().__init__()
        self._token = token.value.encode("utf-8") if token is not None else None

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:  # noqa: N802
        if path != b"healthz" and self._token is not None:
            given = request.getHeader(b"authorization") or b""
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(),
                                                                      self._token):
                return _Text(401, "a bearer token is needed\n")
        child: Resource = super().getChildWithDefault(path, request)
        return child


class _BoundedRequest(Request):
    """A request whose body is kept in memory up to C{MAX_BODY} bytes, never in a
    temporary file; a longer one is answered 413 and the connection closed."""

    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        self.content = self._body = BytesIO()
        if length is not None and length > MAX_BODY:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self._refused:
            return  # the rest of what was already read, after the refusal
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refuse()
            return
        self._body.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self._refused:
            return  # the rest of a chunked body already read: it was answered 413
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        """Answer 413 and close, as soon as the headers or the body say it is too long.

        The answer is written directly, as Twisted answers a malformed request: the
        request line has not been handed to the request yet.
        """
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after this
        transport = self.channel.transport
        if transport is not None:
            transport.write(_TOO_LARGE)
        self.channel.loseConnection()


class AdminSite(Site):
    """The admin pages; scrapes and probes are not logged one by one."""

    noisy = False
    requestFactory = _BoundedRequest

    def log(self, request: Any) -> None:
        """No access log: Prometheus asks every few seconds."""


class _TimedConnection(ProtocolWrapper):
    """An admin connection, closed after C{MAX_CONNECTION_TIME} seconds."""

    factory: AdminListener
    _timer: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        super().makeConnection(transport)
        self._timer = self.factory.clock.callLater(MAX_CONNECTION_TIME, self.loseConnection)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        super().connectionLost(reason)


class AdminListener(WrappingFactory):
    """The admin site, with at most C{MAX_CONNECTIONS} connections open at once, each for
    at most C{MAX_CONNECTION_TIME} seconds."""

    noisy = False
    protocol = _TimedConnection

    def __init__(self, site: AdminSite, clock: Any) -> None:
        super().__init__(site)
        self.clock = clock

    # None is how a factory refuses a connection (IProtocolFactory.buildProtocol).
    def buildProtocol(  # type: ignore[override]  # noqa: N802
            self, addr: IAddress | None) -> ProtocolWrapper | None:
        if len(self.protocols) >= MAX_CONNECTIONS:
            return None  # the port closes the connection at once
        return super().buildProtocol(addr)


#: /metrics with [server] workers above 1, where the supervisor serves the admin listener.
NO_METRICS = ("/metrics is not served with [server] workers above 1: each worker counts "
              "its own messages, sessions, pool and spool.  /healthz and /readyz are.\n")


def admin_site(metrics: Metrics, probe: ReadinessProbe, token: Secret | None,
               workers: int = 1) -> AdminListener:
    root = _Root(token)
    root.putChild(b"metrics", _Metrics(metrics) if workers == 1 else _Text(501, NO_METRICS))
    root.putChild(b"healthz", _Text(200, "ok\n"))
    root.putChild(b"readyz", _Ready(probe))
    return AdminListener(AdminSite(root), probe.clock)
