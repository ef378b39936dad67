"""The downstream SMTP server: the state machine every legacy client talks to.

This module holds the session's life (connect, TLS, timeouts, disconnect) and its
session commands; the shared reply machinery is L{smtpbridge.serverbase}, AUTH is
L{smtpbridge.serverauth} and the mail transaction L{smtpbridge.mailcommands}.  After
STARTTLS everything the client sent ahead is thrown away (RFC 3207, CVE-2011-0411).
A TLS handshake that fails (implicit or after STARTTLS) is logged with OpenSSL's reason,
what the client offered and the setting that would serve it (L{smtpbridge.handshake}),
and counted per listener and reason.
"""

from __future__ import annotations

from typing import Any

import attr
from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge import sasl
from smtpbridge.deadline import Deadline
from smtpbridge.errors import SMTPReplyError
from smtpbridge.handshake import CLOSED, TIMEOUT, HandshakeFailures, ListenerTLS, diagnose
from smtpbridge.interfaces import IAccessPolicy, IDelivery, IPasswordChecker, IStatistics
from smtpbridge.limits import ConnectionGovernor
from smtpbridge.lines import no_delay
from smtpbridge.mailcommands import MailCommands
from smtpbridge.model import Reply
from smtpbridge.networks import normalise_address
from smtpbridge.replies import (
    BYE,
    HELP_REPLY,
    NOT_IMPLEMENTED,
    OK,
    READY_FOR_TLS,
    TLS_ACTIVE,
    VRFY_REPLY,
    syntax,
)
from smtpbridge.serverauth import AuthCommands
from smtpbridge.serverbase import ListenerSettings, ServerSession, SessionLogger
from smtpbridge.throttle import AuthThrottle
from smtpbridge.tls import (
    ServerTLS,
    client_first_bytes,
    connection_summary,
    forget_first_bytes,
    legacy_cipher_names,
    peer_fingerprint,
    tls_failure_reason,
)

__all__ = ["ListenerSettings", "SMTPServerFactory", "SMTPServerProtocol"]


class SMTPServerFactory(Factory):
    """Builds one L{SMTPServerProtocol} per connection of a listener, and counts them:
    per listener and per client address, with the limits of the listener's settings.

    Its sessions log to C{log} (by default the namespace ``smtpbridge.server``) and
    count their failed TLS handshakes in C{handshake_failures}, which the bridge's
    listeners share.
    """

    noisy = False

    def __init__(self, settings: ListenerSettings, delivery: IDelivery, policy: IAccessPolicy,
                 checker: IPasswordChecker | None, clock: IReactorTime,
                 tls: ServerTLS | None = None, throttle: AuthThrottle | None = None,
                 keep_password: bool = False, governor: ConnectionGovernor | None = None,
                 log: SessionLogger | None = None,
                 handshake_failures: HandshakeFailures | None = None,
                 statistics: IStatistics | None = None) -> None:
        self.settings = settings
        self.delivery = delivery
        self.policy = policy
        self.checker = checker
        self.clock = clock
        self.tls = tls
        self.throttle = throttle
        self.keep_password = keep_password  # passthrough needs the login's password
        self.governor = governor
        self.log = log or SessionLogger()
        self.handshake_failures = handshake_failures or HandshakeFailures()
        self.statistics = statistics
        self.open = 0
        self.per_client: dict[str, int] = {}
        self.sessions: set[ServerSession] = set()

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:  # noqa: N802
        protocol = SMTPServerProtocol(self)
        protocol.factory = self
        return protocol

    def opened(self, client: str, session: ServerSession) -> Reply | None:
        """Count a new connection; the 421 to close it with when it is one too many."""
        self.sessions.add(session)
        self.open += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        if self.governor is not None:
            self.governor.opened()
        if self.open > self.settings.max_connections:
            return Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many "
                                       "connections; try again later")
        if self.per_client[client] > self.settings.max_connections_per_client:
            return Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many "
                                       "connections from your address; try again later")
        return None

    def closed(self, client: str, session: ServerSession) -> None:
        self.sessions.discard(session)
        self.open -= 1
        left = self.per_client.get(client, 1) - 1
        if left > 0:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)
        if self.governor is not None:
            self.governor.closed()


@implementer(IHandshakeListener)
class SMTPServerProtocol(AuthCommands, MailCommands):
    """One client session."""

    _counted: str | None = None  # the client address counted by the factory
    _handshake_done = False

    # Connection events.

    def connectionMade(self) -> None:  # noqa: N802
        no_delay(self.transport)
        peer = self.connection.getPeer()
        self.client = attr.evolve(self.client, peer_host=str(getattr(peer, "host", peer)),
                                  peer_port=int(getattr(peer, "port", 0) or 0))
        self.note("connect from [{host}]:{port} on listener {listener}",
                  host=self.client.peer_host, port=self.client.peer_port,
                  listener=self.settings.name)
        self.handshake = Deadline(self.services.clock, self.settings.handshake_timeout,
                                  self._handshake_timeout)
        if self._tls_active:
            self.handshake.start()
        self.start_session()
        self._counted = normalise_address(self.client.peer_host)
        refusal = self.services.opened(self._counted, self)
        if refusal is not None:
            self.note("refused: {text}", text=refusal.text)
            # A refused connection holds no one's place while it closes; one that has not
            # done its TLS handshake could not even read why, and is dropped at once.
            self.services.closed(self._counted, self)
            self._counted = None
            if self._tls_active and not self._handshake_done:
                self.abort("refused before its TLS handshake")
            else:
                self.close(refusal)
            return
        self.reply(Reply(220, None, f"{self.settings.hostname} ESMTP smtpbridge"))

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshake.stop()
        self._handshake_done = True
        forget_first_bytes(self.transport)
        self.watch_output()
        version, cipher = connection_summary(self.transport)
        certificate = peer_fingerprint(self.transport)
        self.client = attr.evolve(self.client, tls_version=version, tls_cipher=cipher,
                                  certificate=certificate)
        self.note("TLS established: {version} {cipher}{certificate}", version=version,
                  cipher=cipher,
                  certificate=f", client certificate {certificate}" if certificate else "")
        if self.services.statistics is not None:
            self.services.statistics.tls(self.settings.name, version or "unknown",
                                         cipher or "unknown")

    def _handshake_timeout(self) -> None:
        seconds = self.settings.handshake_timeout
        self._handshake_failed(f"{TIMEOUT} ({seconds:g} s)", TIMEOUT)
        self.abort(f"TLS handshake not done within {seconds:g} s")

    def _handshake_failed(self, reason: str, key: str | None = None) -> None:
        """Log why the handshake failed, with what the client offered and a hint when
        another setting would serve it; count it by reason."""
        settings = self.settings
        diagnosis = diagnose(client_first_bytes(self.transport), key or reason,
                             ListenerTLS(settings.name, settings.tls, settings.min_tls_version),
                             legacy_cipher_names())
        self.services.handshake_failures.add(settings.name, diagnosis.key)
        self.note("TLS handshake failed from [{host}] on listener {listener}: {reason}; "
                  "{offer}{hint}", host=self.client.peer_host, listener=settings.name,
                  reason=reason, offer=diagnosis.offer,
                  hint=f"; hint: {diagnosis.hint}" if diagnosis.hint else "",
                  failure_key=diagnosis.key)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self._tls_active and not self._handshake_done and not self._closing:
            if reason.check(SSL.Error):
                self._handshake_failed(tls_failure_reason(reason, self.client.peer_host))
            elif client_first_bytes(self.transport):  # not a bare connect-and-close
                self._handshake_failed(CLOSED)
        self.handshake.stop()
        self.end_session()
        if self._counted is not None:
            self.services.closed(self._counted, self)
            self._counted = None
        self.note("disconnect from [{host}]", host=self.client.peer_host)

    # Session commands.

    def _greet(self, argument: str, usage: str, esmtp: bool) -> None:
        name = argument.split(maxsplit=1)[0] if argument.strip() else ""
        if not name:
            raise SMTPReplyError(syntax(usage))
        self._end_transaction(abort=True)
        self.client = attr.evolve(self.client, helo=name, esmtp=esmtp)

    def smtp_HELO(self, argument: str) -> Reply:  # noqa: N802
        self._greet(argument, "HELO hostname", esmtp=False)
        return Reply(250, None, self.settings.hostname)

    def smtp_EHLO(self, argument: str) -> Reply:  # noqa: N802
        self._greet(argument, "EHLO hostname", esmtp=True)
        lines = [self.settings.hostname, "PIPELINING", f"SIZE {self.settings.max_message_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.settings.tls == "starttls" and not self._tls_active:
            lines.append("STARTTLS")
        if self._auth_offered():
            mechanisms = " ".join(sasl.SERVER_MECHANISMS)
            lines += [f"AUTH {mechanisms}", f"AUTH={mechanisms}"]
        return Reply(250, None, "\n".join(lines))

    def smtp_STARTTLS(self, argument: str) -> Reply | None:  # noqa: N802
        if self.settings.tls == "none" or self.services.tls is None:
            return NOT_IMPLEMENTED
        if self._tls_active:
            return TLS_ACTIVE
        if argument:
            return syntax("STARTTLS")
        self.reply(READY_FOR_TLS)
        # Anything the client sent after STARTTLS in clear text is discarded.
        self.clearLineBuffer()
        self._reprocess = False
        self._end_transaction(abort=True)
        self.client = attr.evolve(self.client, helo=None, login=None)
        self._tls_active = True
        self.handshake.start()
        self.unwatch_output()
        self.flush_replies()  # the 220 leaves in clear text
        self.connection.startTLS(self.services.tls)
        return None

    def smtp_NOOP(self, argument: str) -> Reply:  # noqa: N802
        return OK

    def smtp_RSET(self, argument: str) -> Reply:  # noqa: N802
        if argument:
            return syntax("RSET")
        self._end_transaction(abort=True)
        return OK

    def smtp_VRFY(self, argument: str) -> Reply:  # noqa: N802
        return VRFY_REPLY if argument else syntax("VRFY address")

    def smtp_HELP(self, argument: str) -> Reply:  # noqa: N802
        return HELP_REPLY

    def smtp_QUIT(self, argument: str) -> None:  # noqa: N802
        self.close(BYE)

    def _not_implemented(self, argument: str) -> Reply:
        return NOT_IMPLEMENTED

    smtp_EXPN = smtp_BDAT = smtp_ETRN = smtp_TURN = _not_implemented  # noqa: N815
