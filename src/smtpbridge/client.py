"""The upstream SMTP client protocol and the session it offers once set up.

L{UpstreamProtocol} frames replies, times each step out and records the first
failure; L{UpstreamSession} is the L{IUpstreamSession} the delivery drives.  How a
session is set up (connect, STARTTLS, verify, AUTH) is L{smtpbridge.connector}'s job.
Failures are L{UpstreamError}s with a 4xx the bridge can give its client as is,
naming the upstream and what went wrong; replies to MAIL, RCPT, DATA and the final
dot are returned as they are, to be passed on verbatim.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import attr
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator as TLSOptions
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.errors import SMTPReplyError, UpstreamError
from smtpbridge.interfaces import IUpstreamSession
from smtpbridge.lines import SMTPLineReceiver
from smtpbridge.model import Reply, Route
from smtpbridge.replies import UpstreamFailure
from smtpbridge.tls import public_key_pin, tls_failure_reason
from smtpbridge.wire import END_OF_DATA, ReplyParser, encode_lines, reply_line

log = Logger()

_HIDDEN = "<hidden>"

#: How a failed session's connection ends: at once, after what was written, after a
#: QUIT (only under TLS: nothing is sent in clear text after EHLO), or not at all
#: (it is already gone).
Close = Literal["abort", "lose", "quit", "none"]


def where(route: Route) -> str:
    """The upstream as administrators write it: host:port, IPv6 in brackets."""
    host = f"[{route.host}]" if ":" in route.host else route.host
    return f"{host}:{route.port}"


def upstream_error(route: Route, failure: UpstreamFailure, text: str) -> UpstreamError:
    """An error whose reply names the upstream."""
    return UpstreamError(failure.reply(where(route), text))


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
class UpstreamProtocol(SMTPLineReceiver, TimeoutMixin):
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
        self.error: SMTPReplyError | None = None
        self.secrets: tuple[str, ...] = ()
        self.handshaking = route.tls == "implicit"
        self.tls_active = self.handshaking
        self.in_data = False
        self.quiet = False  # a failure is expected (QUIT): do not log it
        self.greeting: Deferred[Reply] | None = None

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:  # noqa: N802
        """TimeoutMixin's timer, on the clock the session was given."""
        return self._clock.callLater(period, func)

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
            pin = public_key_pin(self.connection.getPeerCertificate())
            if pin not in self.route.pins:
                self.fail(self.error_for(UpstreamFailure.TLS, "TLS failed: the certificate's "
                                         f"public key sha256/{pin} is not the pinned one"))
                return
        self.handshaking = False
        if self._pending and self._pending[0].step == "TLS handshake":
            self._pending[0].step = "EHLO" if self.route.tls == "starttls" else "greeting"
            self.setTimeout(self.route.timeout)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.setTimeout(None)
        if self.error is not None:
            return
        if self.handshaking:
            if reason.check(SSL.Error, VerificationError):
                why = tls_failure_reason(reason, self.route.host)
            else:
                why = ("the connection was closed during the handshake (no TLS version or "
                       "cipher in common?)")
            self.fail(self.error_for(UpstreamFailure.TLS, f"TLS failed: {why}"), close="none")
            return
        self.fail(self.error_for(UpstreamFailure.LOST,
                                 f"closed the connection during {self._step}"), close="none")

    # Replies.

    def line_received(self, line: bytes) -> None:
        if self.error is not None:
            return
        try:
            reply = self._parser.feed(line)
        except ValueError:
            self.fail(self.error_for(UpstreamFailure.PROTOCOL,
                                     f"sent a malformed reply during {self._step}: "
                                     f"{line[:80].decode('utf-8', 'replace')!r}"))
            return
        if reply is None:
            return
        if not self._pending:
            self.fail(self.error_for(UpstreamFailure.LOST,
                                     f"sent an unexpected reply: {reply_line(reply)}"))
            return
        pending = self._pending.popleft()
        self.setTimeout(self.route.timeout if self._pending else None)
        pending.deferred.callback(reply)

    def line_too_long(self) -> None:
        self.fail(self.error_for(UpstreamFailure.PROTOCOL,
                                 f"sent an over-long line during {self._step}"))

    # Commands.

    def send(self, command: str | bytes, step: str) -> Deferred[Reply]:
        """Write one command line; fires with its reply."""
        if self.error is not None:
            return fail(self.error)
        line = command.encode("utf-8") if isinstance(command, str) else command
        if b"\r" in line or b"\n" in line:
            return fail(ValueError("an SMTP command may not hold CR or LF"))
        self.connection.write(line + b"\r\n")
        return self.expect(step)

    def expect(self, step: str) -> Deferred[Reply]:
        """A Deferred for the next reply (after what was written), named C{step}."""
        deferred: Deferred[Reply] = Deferred()
        self._pending.append(_Pending(deferred, step))
        if len(self._pending) == 1:
            self.setTimeout(self.route.timeout)
        return deferred

    def start_tls(self, options: TLSOptions) -> None:
        """Switch to TLS; anything the server sent ahead in clear text is dropped."""
        self.clearLineBuffer()
        self._reprocess = False
        self._parser = ReplyParser()
        self.handshaking = self.tls_active = True
        self.connection.startTLS(options)

    # Timeouts and failures.

    @property
    def _step(self) -> str:
        if self._pending:
            return self._pending[0].step
        return "the message body" if self.in_data else "an idle session"

    def timeoutConnection(self) -> None:  # noqa: N802
        self.fail(self.error_for(UpstreamFailure.LOST, f"timed out during {self._step}"))

    def error_for(self, failure: UpstreamFailure, text: str) -> UpstreamError:
        """An error naming this upstream; secrets in C{text} are hidden."""
        for secret in self.secrets:
            text = text.replace(secret, _HIDDEN)
        return upstream_error(self.route, failure, text)

    def fail(self, error: SMTPReplyError, close: Close = "abort") -> None:
        """Mark the session broken with C{error}: every pending and later call fails with it.

        C{close} says how the connection ends (see L{Close}).
        """
        if self.error is not None:
            return
        self.error = error
        pending, self._pending = self._pending, deque()
        self.setTimeout(None)
        if not self.quiet:
            log.warn("{text}", text=error.reply.text)
        if close != "none" and self.transport is not None:
            if close == "abort":
                self.connection.abortConnection()
            else:
                if close == "quit" and self.tls_active and not self.handshaking:
                    self.connection.write(b"QUIT\r\n")
                self.connection.loseConnection()
        for item in pending:
            item.deferred.errback(error)


@implementer(IUpstreamSession)
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

    def mail(self, sender: str, params: Mapping[str, str | None]) -> Deferred[Reply]:
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
        return self._command(" ".join(words), "MAIL")

    def rcpt(self, recipient: str, params: Mapping[str, str | None]) -> Deferred[Reply]:
        """RCPT TO; no parameter is passed on (the bridge offers no RCPT extension)."""
        return self._command(f"RCPT TO:<{recipient}>", "RCPT")

    def _command(self, line: str, step: str) -> Deferred[Reply]:
        """Send a command, unless the session failed or is in DATA (where the line would
        become part of the message)."""
        protocol = self._protocol
        if protocol.error is not None:
            return fail(protocol.error)
        if protocol.in_data or self._data_pending:
            return fail(RuntimeError(f"{step} during DATA"))
        return protocol.send(line, step)

    _data_pending = False  # DATA was sent, its reply has not come

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        """DATA: fires with the upstream's 354 (the upstream's write buffer then pauses
        C{producer}), or its refusal."""
        protocol = self._protocol

        def answered(reply: Reply) -> Reply:
            self._data_pending = False
            protocol.in_data = reply.code == 354
            if protocol.in_data and protocol.error is None:
                protocol.connection.registerProducer(producer, True)
            return reply

        sent = self._command("DATA", "DATA")
        if not sent.called:
            self._data_pending = True
        return sent.addCallback(answered)

    def _unregister_producer(self) -> None:
        if self._protocol.error is None and self._protocol.transport is not None:
            self._protocol.connection.unregisterProducer()

    def write_lines(self, lines: Sequence[bytes]) -> None:
        """Body lines, unstuffed and without line endings; sent dot-stuffed with CRLF."""
        protocol = self._protocol
        if protocol.error is None:
            if not protocol.in_data:
                raise RuntimeError("write_lines outside DATA")
            protocol.connection.write(encode_lines(lines))

    def end_data(self) -> Deferred[Reply]:
        """The final dot: fires with the upstream's verdict on the message."""
        protocol = self._protocol
        if protocol.error is not None:
            return fail(protocol.error)
        if not protocol.in_data:
            return fail(RuntimeError("end_data outside DATA"))
        self._unregister_producer()
        protocol.in_data = False
        protocol.connection.write(END_OF_DATA)
        return protocol.expect("end of data")

    def reset(self) -> Deferred[Reply]:
        """RSET."""
        return self._command("RSET", "RSET")

    def quit(self) -> Deferred[None]:
        """QUIT, then close; never fails.  In DATA (or waiting for its 354) the session is
        aborted instead: a QUIT there would be a line of the message."""
        protocol = self._protocol
        if protocol.error is not None:
            return succeed(None)
        if protocol.in_data or self._data_pending:
            self.abort()
            return succeed(None)
        protocol.quiet = True
        closed = protocol.error_for(UpstreamFailure.LOST, "session was closed")
        return protocol.send("QUIT", "QUIT").addBoth(
            lambda _: protocol.fail(closed, close="lose"))

    def abort(self) -> None:
        """Drop the connection at once, so the upstream never sees a final dot."""
        protocol = self._protocol
        if protocol.error is None:
            if protocol.in_data:
                self._unregister_producer()
            log.info("upstream {where}: transaction aborted", where=where(self.route))
            protocol.quiet = True
            protocol.fail(protocol.error_for(UpstreamFailure.LOST, "session was aborted"))
