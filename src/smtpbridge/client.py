"""The upstream SMTP client: connect, STARTTLS (required), verify, AUTH, then transactions.

Failures of the connection or its setup are L{SMTPReplyError}s with a 4xx the bridge
can give its client as is, naming the upstream and what went wrong.  Replies to
MAIL, RCPT, DATA and the final dot are returned as they are, to be passed on verbatim.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import attr
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator as TLSOptions
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.clientauth import authenticate, refuse
from smtpbridge.errors import SMTPReplyError
from smtpbridge.lines import SMTPLineReceiver
from smtpbridge.model import Reply, Route, UpstreamAccount
from smtpbridge.tls import (
    connection_summary,
    public_key_pin,
    tls_failure_reason,
    upstream_tls_options,
)
from smtpbridge.wire import END_OF_DATA, ReplyParser, encode_lines, reply_line

log = Logger()

_HIDDEN = "<hidden>"


def where(route: Route) -> str:
    """The upstream as administrators write it: host:port, IPv6 in brackets."""
    host = f"[{route.host}]" if ":" in route.host else route.host
    return f"{host}:{route.port}"


def upstream_error(route: Route, code: int, enhanced: str, text: str) -> SMTPReplyError:
    """An error whose reply names the upstream."""
    return SMTPReplyError(Reply(code, enhanced, f"Upstream {where(route)} {text}"))


def parse_features(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) and their parameters; "AUTH=X" counts as AUTH X."""
    features: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword, params = keyword.upper(), params.strip()
        if keyword.startswith("AUTH="):
            keyword, params = "AUTH", f"{keyword[5:]} {params}".strip()
        if keyword == "AUTH" and "AUTH" in features:
            params = " ".join(dict.fromkeys(f"{features['AUTH']} {params}".upper().split()))
        if keyword:
            features[keyword] = params
    return features


@attr.define
class _Pending:
    """A command (or the greeting) waiting for its reply."""

    deferred: Deferred[Reply]
    step: str


@implementer(IHandshakeListener)
class UpstreamProtocol(SMTPLineReceiver):
    """Reply framing, per-step timeouts and failure bookkeeping of one upstream connection.

    Replies arrive in the order commands were sent, so each pending command
    holds one Deferred in a queue; the oldest one's step is what times out.
    """

    def __init__(self, route: Route, clock: IReactorTime) -> None:
        super().__init__()
        self.route = route
        self._clock = clock
        self._parser = ReplyParser()
        self._pending: deque[_Pending] = deque()
        self._timer: Any = None  # the IDelayedCall of the oldest pending step
        self.error: SMTPReplyError | None = None
        self.secrets: tuple[str, ...] = ()
        self.handshaking = route.tls == "implicit"
        self.tls_active = self.handshaking
        self.in_data = False
        self.quiet = False  # a failure is expected (QUIT): do not log it
        self.greeting: Deferred[Reply] | None = None

    @property
    def label(self) -> str:
        """The upstream as host:port, for log lines."""
        return where(self.route)

    @property
    def idle(self) -> bool:
        return self.error is None and not self._pending and not self.in_data

    # Connection events.

    def connectionMade(self) -> None:  # noqa: N802
        self.greeting = self.expect("TLS handshake" if self.handshaking else "greeting")

    def handshakeCompleted(self) -> None:  # noqa: N802
        if self.route.pins:
            pin = public_key_pin(self.transport.getPeerCertificate())
            if pin not in self.route.pins:
                self.fail(self.error_for(454, "4.7.5", "TLS failed: the certificate's public "
                                                       f"key sha256/{pin} is not the pinned one"))
                return
        self.handshaking = False
        if self._pending and self._pending[0].step == "TLS handshake":
            self._pending[0].step = "EHLO" if self.route.tls == "starttls" else "greeting"
            self._arm()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self.error is not None:
            return
        if self.handshaking:
            if reason.check(SSL.Error, VerificationError):
                why = tls_failure_reason(reason, self.route.host)
            else:
                why = ("the connection was closed during the handshake (no TLS version or "
                       "cipher in common?)")
            self.fail(self.error_for(454, "4.7.5", f"TLS failed: {why}"), close="none")
            return
        self.fail(self.error_for(451, "4.4.2", f"closed the connection during {self._step}"),
                  close="none")

    # Replies.

    def line_received(self, line: bytes) -> None:
        if self.error is not None:
            return
        try:
            reply = self._parser.feed(line)
        except ValueError:
            self.fail(self.error_for(451, "4.5.0", f"sent a malformed reply during {self._step}: "
                                                   f"{line[:80].decode('utf-8', 'replace')!r}"))
            return
        if reply is None:
            return
        if not self._pending:
            self.fail(self.error_for(451, "4.4.2",
                                     f"sent an unexpected reply: {reply_line(reply)}"))
            return
        pending = self._pending.popleft()
        self._arm()
        pending.deferred.callback(reply)

    def line_too_long(self) -> None:
        self.fail(self.error_for(451, "4.5.0", f"sent an over-long line during {self._step}"))

    # Commands.

    def send(self, command: str | bytes, step: str) -> Deferred[Reply]:
        """Write one command line; fires with its reply."""
        if self.error is not None:
            return fail(self.error)
        line = command.encode("utf-8") if isinstance(command, str) else command
        if b"\r" in line or b"\n" in line:
            return fail(ValueError("an SMTP command may not hold CR or LF"))
        self.transport.write(line + b"\r\n")
        return self.expect(step)

    def expect(self, step: str) -> Deferred[Reply]:
        """A Deferred for the next reply (after what was written), named C{step}."""
        deferred: Deferred[Reply] = Deferred()
        self._pending.append(_Pending(deferred, step))
        if len(self._pending) == 1:
            self._arm()
        return deferred

    def start_tls(self, options: TLSOptions) -> None:
        """Switch to TLS; anything the server sent ahead in clear text is dropped."""
        self.clearLineBuffer()
        self._reprocess = False
        self._parser = ReplyParser()
        self.handshaking = self.tls_active = True
        self.transport.startTLS(options)

    # Timeouts and failures.

    @property
    def _step(self) -> str:
        if self._pending:
            return self._pending[0].step
        return "the message body" if self.in_data else "an idle session"

    def _arm(self) -> None:
        """(Re)start the timer of the oldest pending step, if any."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._pending:
            self._timer = self._clock.callLater(self.route.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self.fail(self.error_for(451, "4.4.2", f"timed out during {self._step}"))

    def error_for(self, code: int, enhanced: str, text: str) -> SMTPReplyError:
        """An error naming this upstream; secrets in C{text} are hidden."""
        for secret in self.secrets:
            text = text.replace(secret, _HIDDEN)
        return upstream_error(self.route, code, enhanced, text)

    def fail(self, error: SMTPReplyError, close: str = "abort") -> None:
        """Mark the session broken with C{error}: every pending and later call fails with it.

        C{close} says how the connection ends: "abort" at once, "lose" after what
        was written, "quit" after a QUIT when TLS is up (nothing is sent in clear
        text after EHLO), "none" when it is already gone.
        """
        if self.error is not None:
            return
        self.error = error
        pending, self._pending = self._pending, deque()
        self._arm()
        if not self.quiet:
            log.warn("{text}", text=error.reply.text)
        if close != "none" and self.transport is not None:
            if close == "abort":
                self.transport.abortConnection()
            else:
                if close == "quit" and self.tls_active and not self.handshaking:
                    self.transport.write(b"QUIT\r\n")
                self.transport.loseConnection()
        for item in pending:
            item.deferred.errback(error)


class UpstreamSession:
    """One upstream SMTP session: connected, TLS verified, authenticated, ready for MAIL."""

    def __init__(self, protocol: UpstreamProtocol, features: dict[str, str]) -> None:
        self._protocol = protocol
        self.route = protocol.route
        self.features = features

    @property
    def usable(self) -> bool:
        """Connected and no command pending."""
        return self._protocol.idle

    def mail(self, sender: str, params: dict[str, str | None]) -> Deferred[Reply]:
        """MAIL FROM, passing on only the parameters the upstream advertised."""
        words = [f"MAIL FROM:<{sender}>"]
        for key, value in params.items():
            key = key.upper()
            if key == "SIZE" and value and "SIZE" in self.features:
                words.append(f"SIZE={value}")
            elif key == "BODY" and (value or "").upper() == "8BITMIME" \
                    and "8BITMIME" in self.features:
                words.append("BODY=8BITMIME")
            elif key == "SMTPUTF8" and "SMTPUTF8" in self.features:
                words.append("SMTPUTF8")
        return self._protocol.send(" ".join(words), "MAIL")

    def rcpt(self, recipient: str, params: dict[str, str | None]) -> Deferred[Reply]:
        """RCPT TO; no parameter is passed on (the bridge offers no RCPT extension)."""
        return self._protocol.send(f"RCPT TO:<{recipient}>", "RCPT")

    def data(self) -> Deferred[Reply]:
        """DATA: fires with the upstream's 354, or its refusal."""
        def answered(reply: Reply) -> Reply:
            self._protocol.in_data = reply.code == 354
            return reply
        return self._protocol.send("DATA", "DATA").addCallback(answered)

    def register_producer(self, producer: IPushProducer) -> None:
        """Let the upstream's write buffer pause the downstream client."""
        if self._protocol.error is None:
            self._protocol.transport.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.unregisterProducer()

    def write_lines(self, lines: list[bytes]) -> None:
        """Body lines, unstuffed and without line endings; sent dot-stuffed with CRLF."""
        protocol = self._protocol
        if protocol.error is None:
            if not protocol.in_data:
                raise RuntimeError("write_lines outside DATA")
            protocol.transport.write(encode_lines(lines))

    def end_data(self) -> Deferred[Reply]:
        """The final dot: fires with the upstream's verdict on the message."""
        protocol = self._protocol
        if protocol.error is not None:
            return fail(protocol.error)
        if not protocol.in_data:
            return fail(RuntimeError("end_data outside DATA"))
        protocol.in_data = False
        protocol.transport.write(END_OF_DATA)
        return protocol.expect("end of data")

    def rset(self) -> Deferred[Reply]:
        return self._protocol.send("RSET", "RSET")

    def quit(self) -> Deferred[None]:
        """QUIT, then close; never fails."""
        protocol = self._protocol
        if protocol.error is not None:
            return succeed(None)
        protocol.quiet = True
        closed = protocol.error_for(451, "4.4.2", "session was closed")
        return protocol.send("QUIT", "QUIT").addBoth(
            lambda _: protocol.fail(closed, close="lose"))

    def abort(self) -> None:
        """Drop the connection at once, so the upstream never sees a final dot."""
        protocol = self._protocol
        if protocol.error is None:
            log.info("upstream {where}: transaction aborted", where=where(self.route))
            protocol.quiet = True
            protocol.fail(protocol.error_for(451, "4.4.2", "session was aborted"))


Progress = Callable[[str, str], None]


def _quiet(step: str, detail: str) -> None:
    """Progress nobody listens to."""


async def _set_up(protocol: UpstreamProtocol, account: UpstreamAccount | None, helo_name: str,
                  tls_options: TLSOptions, progress: Progress) -> UpstreamSession:
    assert protocol.greeting is not None, "set_up needs a connected protocol"
    greeting = await protocol.greeting
    if greeting.code != 220:
        raise refuse(protocol, 451, "4.3.2", f"refused the session: {reply_line(greeting)}")
    progress("greeting", reply_line(greeting))
    ehlo = await protocol.send(f"EHLO {helo_name}", "EHLO")
    if ehlo.code != 250:
        if ehlo.code < 500:
            raise refuse(protocol, 451, "4.3.2", f"refused EHLO: {reply_line(ehlo)}")
        helo = await protocol.send(f"HELO {helo_name}", "HELO")
        if helo.code != 250:
            raise refuse(protocol, 451, "4.3.2", f"refused EHLO and HELO: {reply_line(helo)}")
        need = "STARTTLS" if protocol.route.tls == "starttls" else "AUTH"
        raise refuse(protocol, 454, "4.7.0", f"does not speak ESMTP; cannot use {need}")
    if protocol.route.tls == "starttls":
        if "STARTTLS" not in parse_features(ehlo):
            raise refuse(protocol, 454, "4.7.0",
                         "does not offer STARTTLS; the bridge never submits in clear text")
        progress("EHLO", "STARTTLS offered")
        reply = await protocol.send("STARTTLS", "STARTTLS")
        if reply.code != 220:
            raise refuse(protocol, 454, "4.7.0", f"refused STARTTLS: {reply_line(reply)}")
        protocol.start_tls(tls_options)
        ehlo = await protocol.send(f"EHLO {helo_name}", "TLS handshake")
        if ehlo.code != 250:
            raise refuse(protocol, 451, "4.3.2",
                         f"refused EHLO after STARTTLS: {reply_line(ehlo)}")
    version, cipher = connection_summary(protocol.transport)
    progress("TLS", f"{version} {cipher}, certificate verified for {protocol.route.host}")
    features = parse_features(ehlo)
    if account is not None:
        mechanism = await authenticate(protocol, account, features)
        progress("AUTH", f"{mechanism} accepted for {account.username}")
    log.info("upstream {where}: TLS {version} {cipher}, {auth}", where=where(protocol.route),
             version=version, cipher=cipher,
             auth=f"authenticated as {account.username}" if account else "no AUTH")
    return UpstreamSession(protocol, features)


def set_up(protocol: UpstreamProtocol, account: UpstreamAccount | None, helo_name: str,
           tls_options: TLSOptions, progress: Progress | None = None,
           ) -> Deferred[UpstreamSession]:
    """Greeting, EHLO, STARTTLS, EHLO, AUTH on a connected protocol."""
    def failed(failure: Failure) -> Failure:
        if not failure.check(SMTPReplyError, CancelledError):
            log.failure("upstream {where}: setup failed", failure, where=where(protocol.route))
        if failure.check(SMTPReplyError):
            protocol.fail(failure.value)
            return failure  # keeps its kind (LoginRejected)
        protocol.fail(protocol.error_for(451, "4.3.0", "session setup failed"))
        return Failure(protocol.error)

    return Deferred.fromCoroutine(_set_up(protocol, account, helo_name, tls_options,
                                          progress or _quiet)).addErrback(failed)


def _connect_error(failure: Failure, route: Route, timed_out: bool) -> SMTPReplyError:
    if timed_out or failure.check(net_error.TimeoutError, CancelledError,
                                  net_error.ConnectingCancelledError):
        return upstream_error(route, 451, "4.4.2", "timed out during connect")
    if failure.check(net_error.DNSLookupError):
        reason = f"host name {route.host} not found"
    elif failure.check(net_error.ConnectionRefusedError):
        reason = "connection refused"
    else:
        reason = failure.getErrorMessage().rstrip(".") or type(failure.value).__name__
    return upstream_error(route, 451, "4.4.1", f"unreachable: {reason}")


def connect(reactor: Any, route: Route, account: UpstreamAccount | None, helo_name: str,
            tls_options: TLSOptions | None = None, progress: Progress | None = None,
            ) -> Deferred[UpstreamSession]:
    """Open a verified, authenticated upstream session, or fail with a 4xx L{SMTPReplyError}.

    C{progress(step, detail)} hears of each step that succeeded (for C{smtpbridge check}).
    """
    if tls_options is None:
        try:
            tls_options = upstream_tls_options(route)
        except (OSError, ValueError) as e:
            error = upstream_error(route, 454, "4.7.5", f"TLS failed: cannot load CA "
                                                        f"certificates: {e}")
            log.warn("{text}", text=error.reply.text)
            return fail(error)
    options = tls_options
    endpoint: Any = HostnameEndpoint(reactor, route.host, route.port, timeout=route.timeout)
    if route.tls == "implicit":
        endpoint = wrapClientTLS(options, endpoint)
    factory = Factory.forProtocol(lambda: UpstreamProtocol(route, reactor))
    factory.noisy = False
    connecting = endpoint.connect(factory)
    state = {"timed_out": False}

    def time_out() -> None:
        state["timed_out"] = True
        connecting.cancel()

    timer = reactor.callLater(route.timeout, time_out)

    def connected(protocol: UpstreamProtocol) -> Deferred[UpstreamSession]:
        timer.cancel()
        if progress is not None:
            progress("connect", f"connected to {where(route)}")
        return set_up(protocol, account, helo_name, options, progress)

    def not_connected(failure: Failure) -> Failure:
        if timer.active():
            timer.cancel()
        error = _connect_error(failure, route, state["timed_out"])
        log.warn("{text}", text=error.reply.text)
        return Failure(error)

    return connecting.addCallbacks(connected, not_connected)
