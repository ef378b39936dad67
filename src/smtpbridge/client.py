"""The upstream SMTP client protocol: it frames replies, times each step out and records
the first failure.

How a session is set up (connect, STARTTLS, verify, AUTH) is L{smtpbridge.connector}'s
job; the session the delivery then drives is L{smtpbridge.upstreamsession}.  Failures
are L{UpstreamError}s with a 4xx the bridge can give its client as is, naming the
upstream and what went wrong.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Literal

import attr
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator as TLSOptions
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.errors import SMTPReplyError, UpstreamError
from smtpbridge.lines import SMTPLineReceiver, no_delay
from smtpbridge.model import Reply, Route
from smtpbridge.replies import UpstreamFailure
from smtpbridge.tls import public_key_pin, tls_failure_reason
from smtpbridge.wire import ReplyParser, ReplyTooLong, reply_line

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

    early_too_long = True  # an upstream's endless line ends the session at once

    def __init__(self, route: Route, clock: IReactorTime,
                 on_lost: Callable[[], object] | None = None) -> None:
        super().__init__()
        self.route = route
        self.clock = clock
        self._on_lost = on_lost  # told once when the connection is gone
        self._parser = ReplyParser()
        self._pending: deque[_Pending] = deque()
        self.error: SMTPReplyError | None = None
        self.secrets: tuple[str, ...] = ()
        self.handshaking = route.tls == "implicit"
        self.tls_active = self.handshaking
        self.in_data = False
        self.quiet = False  # a failure is expected (QUIT): do not log it
        self.greeting: Deferred[Reply] | None = None
        self._closer: IDelayedCall | None = None  # aborts a close that does not end

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:  # noqa: N802
        """TimeoutMixin's timer, on the clock the session was given."""
        return self.clock.callLater(period, func)

    @property
    def label(self) -> str:
        """The upstream as host:port, for log lines."""
        return where(self.route)

    @property
    def idle(self) -> bool:
        return self.error is None and not self._pending and not self.in_data

    # Connection events.

    def connectionMade(self) -> None:  # noqa: N802
        no_delay(self.transport)
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
        if self._closer is not None and self._closer.active():
            self._closer.cancel()
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()
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
        except ReplyTooLong as e:
            self.fail(self.error_for(UpstreamFailure.LOST, f"sent {e} during {self._step}"))
            return
        except ValueError:  # (secrets hidden before the line is cut, or a part would show)
            shown = self.hide(line.decode("utf-8", "replace"))[:80]
            self.fail(self.error_for(UpstreamFailure.PROTOCOL,
                                     f"sent a malformed reply during {self._step}: {shown!r}"))
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
        return upstream_error(self.route, failure, self.hide(text))

    def hide(self, text: str) -> str:
        """C{text} with every secret this session sent replaced."""
        for secret in self.secrets:
            text = text.replace(secret, _HIDDEN)
        return text

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
                # TLS waits for the upstream's close_notify, which a hung one never sends:
                # its connection (and its host's slot) would stay for good.
                self._closer = self.clock.callLater(self.route.timeout,
                                                    self.connection.abortConnection)
        for item in pending:
            item.deferred.errback(error)
