"""Opening upstream sessions: connect, greeting, EHLO, STARTTLS (required), verify, AUTH.

L{UpstreamConnector} is the bridge's L{IUpstreamConnector}; it builds each route's TLS
client options once and holds the OAuth2 token sources by account name.  Every failure
is an L{UpstreamError} with a 4xx naming the upstream and the step that failed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.internet.defer import TimeoutError as WaitTimeout
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator as TLSOptions
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.client import UpstreamProtocol, parse_features, upstream_error
from smtpbridge.clientauth import authenticate, refuse
from smtpbridge.errors import LoginRejected, SMTPReplyError, Unreachable, UpstreamError
from smtpbridge.interfaces import ITokenSource, IUpstreamConnector, IUpstreamSession
from smtpbridge.limits import FlatRelease
from smtpbridge.model import Route, UpstreamAccount
from smtpbridge.names import CachingResolver, with_resolver
from smtpbridge.replies import UpstreamFailure
from smtpbridge.tls import connection_summary, upstream_tls_options
from smtpbridge.upstreamsession import UpstreamSession
from smtpbridge.wire import reply_line

log = Logger()

#: Seconds a host that could not be reached is not tried again by new transactions.
DOWN_HOLD = 5.0

#: Hears of each step that succeeded: (step, detail).  For ``smtpbridge check``.
Progress = Callable[[str, str], None]


def _quiet(step: str, detail: str) -> None:
    """Progress nobody listens to."""


async def _set_up(protocol: UpstreamProtocol, account: UpstreamAccount | None, helo_name: str,
                  tls_options: TLSOptions, tokens: ITokenSource | None,
                  progress: Progress) -> UpstreamSession:
    assert protocol.greeting is not None, "set_up needs a connected protocol"
    greeting = await protocol.greeting
    if greeting.code != 220:
        raise refuse(protocol, UpstreamFailure.REFUSED,
                     f"refused the session: {reply_line(greeting)}")
    progress("greeting", reply_line(greeting))
    ehlo = await protocol.send(f"EHLO {helo_name}", "EHLO")
    if ehlo.code != 250:
        if ehlo.code < 500:
            raise refuse(protocol, UpstreamFailure.REFUSED, f"refused EHLO: {reply_line(ehlo)}")
        helo = await protocol.send(f"HELO {helo_name}", "HELO")
        if helo.code != 250:
            raise refuse(protocol, UpstreamFailure.REFUSED,
                         f"refused EHLO and HELO: {reply_line(helo)}")
        need = "STARTTLS" if protocol.route.tls == "starttls" else "AUTH"
        raise refuse(protocol, UpstreamFailure.SECURITY, f"does not speak ESMTP; cannot use "
                                                         f"{need}")
    if protocol.route.tls == "starttls":
        if "STARTTLS" not in parse_features(ehlo):
            raise refuse(protocol, UpstreamFailure.SECURITY,
                         "does not offer STARTTLS; the bridge never submits in clear text")
        progress("EHLO", "STARTTLS offered")
        reply = await protocol.send("STARTTLS", "STARTTLS")
        if reply.code != 220:
            raise refuse(protocol, UpstreamFailure.SECURITY,
                         f"refused STARTTLS: {reply_line(reply)}")
        protocol.start_tls(tls_options)
        ehlo = await protocol.send(f"EHLO {helo_name}", "TLS handshake")
        if ehlo.code != 250:
            raise refuse(protocol, UpstreamFailure.REFUSED,
                         f"refused EHLO after STARTTLS: {reply_line(ehlo)}")
    version, cipher = connection_summary(protocol.transport)
    progress("TLS", f"{version} {cipher}, certificate verified for {protocol.route.host}")
    features = parse_features(ehlo)
    valid_until = None
    if account is not None:
        login = await authenticate(protocol, account, features, tokens)
        progress("AUTH", f"{login.mechanism} accepted for {account.username}")
        if login.token is not None and tokens is not None:
            # A session logged in with a token is good while the token is.
            valid_until = tokens.expires_at(login.token)
            if valid_until is None:
                valid_until = protocol.clock.seconds()
    log.info("upstream {where}: TLS {version} {cipher}, {auth}", where=protocol.label,
             version=version, cipher=cipher,
             auth=f"authenticated as {account.username}" if account else "no AUTH")
    return UpstreamSession(protocol, features, valid_until)


def set_up(protocol: UpstreamProtocol, account: UpstreamAccount | None, helo_name: str,
           tls_options: TLSOptions, progress: Progress | None = None,
           tokens: ITokenSource | None = None) -> Deferred[UpstreamSession]:
    """Greeting, EHLO, STARTTLS, EHLO, AUTH on a connected protocol."""
    def failed(failure: Failure) -> Failure:
        if not failure.check(SMTPReplyError, CancelledError):
            log.failure("upstream {where}: setup failed", failure, where=protocol.label)
        if isinstance(failure.value, SMTPReplyError):
            protocol.fail(failure.value)
            return failure  # keeps its kind (LoginRejected)
        error = protocol.error_for(UpstreamFailure.INTERNAL, "session setup failed")
        protocol.fail(error)
        return Failure(error)

    return Deferred.fromCoroutine(_set_up(protocol, account, helo_name, tls_options, tokens,
                                          progress or _quiet)).addErrback(failed)


def _connect_error(failure: Failure, route: Route) -> UpstreamError:
    if failure.check(WaitTimeout, net_error.TimeoutError, CancelledError,
                     net_error.ConnectingCancelledError):
        return upstream_error(route, UpstreamFailure.LOST, "timed out during connect")
    if failure.check(net_error.DNSLookupError):
        reason = f"host name {route.host} not found"
    elif failure.check(net_error.ConnectionRefusedError):
        reason = "connection refused"
    else:
        reason = failure.getErrorMessage().rstrip(".") or type(failure.value).__name__
    return upstream_error(route, UpstreamFailure.UNREACHABLE, f"unreachable: {reason}")


def connect(reactor: Any, route: Route, account: UpstreamAccount | None, helo_name: str,
            tls_options: TLSOptions | None = None, progress: Progress | None = None,
            tokens: ITokenSource | None = None,
            on_lost: Callable[[], object] | None = None,
            names: CachingResolver | None = None) -> Deferred[UpstreamSession]:
    """Open a verified, authenticated upstream session, or fail with a 4xx L{UpstreamError}.

    C{progress(step, detail)} hears of each step that succeeded (for C{smtpbridge check});
    C{on_lost()} is called once when the connection is gone or could not be made.
    C{names} resolves the host (None: the reactor's resolver, a lookup per connection).
    """
    lost = _once(on_lost)
    if tls_options is None:
        try:
            tls_options = upstream_tls_options(route)
        except (OSError, ValueError) as e:
            error = upstream_error(route, UpstreamFailure.TLS,
                                   f"TLS failed: cannot load CA certificates: {e}")
            log.warn("{text}", text=error.reply.text)
            lost()
            return fail(error)
    options = tls_options
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        with_resolver(reactor, names), route.host, route.port, timeout=route.timeout)
    if route.tls == "implicit":
        endpoint = wrapClientTLS(options, endpoint)
    factory = Factory.forProtocol(lambda: UpstreamProtocol(route, reactor, lost))
    factory.noisy = False
    connecting: Deferred[Any] = endpoint.connect(factory)
    connecting.addTimeout(route.timeout, reactor)

    def connected(protocol: UpstreamProtocol) -> Deferred[UpstreamSession]:
        if progress is not None:
            progress("connect", f"connected to {route.host}:{route.port}")
        return set_up(protocol, account, helo_name, options, progress, tokens)

    def not_connected(failure: Failure) -> Failure:
        lost()
        if names is not None:
            names.forget(route.host)  # the addresses did not answer: ask again next time
        error = _connect_error(failure, route)
        log.warn("{text}", text=error.reply.text)
        return Failure(Unreachable(error.reply))

    return connecting.addCallbacks(connected, not_connected)


def _once(call: Callable[[], object] | None) -> Callable[[], None]:
    """C{call}, made safe to call any number of times: it runs the first time only."""
    def run() -> None:
        nonlocal call
        if call is not None:
            pending, call = call, None
            pending()
    return run


class SessionSlots:
    """At most C{route.max_sessions} upstream sessions open at once to one host: a
    transaction beyond them waits up to C{route.session_wait} seconds for one to close,
    then gets 451 4.3.2, so idle clients cannot hold every upstream login at once."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._slots: dict[tuple[str, int], DeferredSemaphore] = {}
        self._release = FlatRelease(clock)

    def in_use(self, route: Route) -> int:
        semaphore = self._slots.get((route.host, route.port))
        return 0 if semaphore is None else semaphore.limit - semaphore.tokens

    def free(self, route: Route) -> bool:
        """True when a slot of the host can be had at once."""
        semaphore = self._slots.get((route.host, route.port))
        return semaphore is None or semaphore.tokens > 0

    def acquire(self, route: Route) -> Deferred[Callable[[], None]]:
        """Fires with the function that gives the slot back (call it once the session's
        connection is gone), or fails with the 451 4.3.2."""
        key = (route.host, route.port)
        semaphore = self._slots.get(key)
        if semaphore is None:
            semaphore = self._slots[key] = DeferredSemaphore(route.max_sessions)
        waiting: Deferred[Any] = semaphore.acquire()

        def timed_out(result: Any, timeout: float) -> Callable[[], None]:
            raise upstream_error(route, UpstreamFailure.REFUSED, f"has {route.max_sessions} "
                                 "sessions open already; try again later")

        if not waiting.called:
            waiting.addTimeout(route.session_wait, self._clock, onTimeoutCancel=timed_out)
        return waiting.addCallback(lambda _: _once(lambda: self._release(semaphore)))


@implementer(IUpstreamConnector)
class UpstreamConnector:
    """Opens sessions for the bridge: its EHLO name, each route's TLS options built once
    (again after L{forget_tls}), host names resolved once a minute, the token sources of
    the OAuth2 accounts by account name."""

    def __init__(self, reactor: Any, helo_name: str,
                 tokens: Mapping[str, ITokenSource] | None = None) -> None:
        self._reactor = reactor
        self._helo_name = helo_name
        self.tokens = dict(tokens or {})
        self._tls: dict[Route, TLSOptions] = {}
        self.slots = SessionSlots(reactor)
        # Hosts that could not be reached just now: (until, the error), by (host, port).
        self._down: dict[tuple[str, int], tuple[float, Unreachable]] = {}
        resolver = getattr(reactor, "nameResolver", None)
        self.names = CachingResolver(resolver, reactor) if resolver is not None else None

    def tls_options(self, route: Route) -> TLSOptions:
        """The route's client TLS options (CA bundle read once); OSError or ValueError."""
        options = self._tls.get(route)
        if options is None:
            options = self._tls[route] = upstream_tls_options(route)
        return options

    def forget_tls(self) -> None:
        """Build every route's TLS options anew on next use (the CA bundles changed)."""
        self._tls.clear()

    def connect(self, route: Route, account: UpstreamAccount | None,
                progress: Progress | None = None) -> Deferred[IUpstreamSession]:
        """A new session once one of the host's L{slots} is free.  A host that could not
        be reached in the last L{DOWN_HOLD} seconds fails at once with the same error
        (while an upstream is down, every transaction goes to the spool without a
        connection attempt of its own)."""
        down = self.known_down(route) if progress is None else None
        if down is not None:
            return fail(down)
        session: Deferred[Any] = self.slots.acquire(route).addCallback(
            lambda release: self.open(route, account, release, progress))
        return session

    def known_down(self, route: Route) -> Unreachable | None:
        """The error of the host's last connection attempt if it failed within the last
        L{DOWN_HOLD} seconds, else None."""
        down = self._down.get((route.host, route.port))
        if down is None:
            return None
        until, error = down
        if self._reactor.seconds() < until:
            return error
        del self._down[(route.host, route.port)]
        return None

    def forget_down(self) -> None:
        """Try every host again at once (``smtpbridge queue flush``: the operator knows
        the upstream is back)."""
        self._down.clear()

    def open(self, route: Route, account: UpstreamAccount | None, release: Callable[[], None],
             progress: Progress | None = None) -> Deferred[IUpstreamSession]:
        """A new session in a slot the caller holds: C{release()} is called once its
        connection is gone (or could not be made)."""
        down = self.known_down(route) if progress is None else None
        if down is not None:
            release()
            return fail(down)
        try:
            options = self.tls_options(route)
        except (OSError, ValueError):
            options = None  # connect() reports it
        tokens = self.tokens.get(account.name) if account is not None else None
        session: Deferred[Any] = connect(self._reactor, route, account, self._helo_name,
                                         options, progress, tokens, on_lost=release,
                                         names=self.names)

        def unreachable(failure: Failure) -> Failure:
            if isinstance(failure.value, Unreachable):
                self._down[(route.host, route.port)] = (self._reactor.seconds() + DOWN_HOLD,
                                                        failure.value)
            return failure

        return session.addErrback(unreachable)


async def connect_first(connector: IUpstreamConnector, routes: tuple[Route, ...],
                        account: UpstreamAccount | None,
                        stop_on_rejection: bool = False, session: str = "-",
                        ) -> IUpstreamSession:
    """A session on the first route that connects, verifies and accepts the login.

    Only setup failures move on to the next host, and they all happen before
    MAIL FROM, so failing over can never send a message twice.  When every host
    fails, a refused login (a verdict on the credentials) wins over the others;
    C{stop_on_rejection} makes it final at once.  C{session} is the downstream session
    id the log lines name.
    """
    error: SMTPReplyError | None = None
    refused: LoginRejected | None = None
    for index, route in enumerate(routes):
        try:
            return await connector.connect(route, account)
        except SMTPReplyError as e:
            error = e
            if isinstance(e, LoginRejected) and refused is None:
                refused = e
                if stop_on_rejection:
                    break
            if index + 1 < len(routes):
                log.warn("{session} upstream {host}:{port} failed ({text}); trying {next}",
                         session=session, host=route.host, port=route.port,
                         text=e.reply.text, next=routes[index + 1].host)
    assert error is not None, "a route list is never empty"
    raise refused or error


def try_login(connector: IUpstreamConnector,
              ) -> Callable[[tuple[Route, ...], UpstreamAccount], Deferred[bool]]:
    """A check that logs in upstream with an account: True, False if the login was
    refused, an error if the upstream could not be asked.  A refusal is not tried on the
    other hosts: a wrong password should not count against the account everywhere."""
    async def check(routes: tuple[Route, ...], account: UpstreamAccount) -> bool:
        try:
            session = await connect_first(connector, routes, account, stop_on_rejection=True)
        except LoginRejected:
            return False
        await session.quit()
        return True

    return lambda routes, account: Deferred.fromCoroutine(check(routes, account))
