"""AUTH for downstream clients (RFC 4954): PLAIN and LOGIN, with or without an initial
response, never before TLS unless a listener allows it; failures slowed and blocked.

Every refusal is logged with the session id, so that a device that cannot log in can
be diagnosed from the log alone: the mechanism it asked for, AUTH before TLS, an
answer to a challenge that looks like the next command.  Never a password.
"""

from __future__ import annotations

from collections.abc import Callable

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from smtpbridge import sasl
from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import IVerifiedLogins
from smtpbridge.model import Reply
from smtpbridge.replies import (
    ALREADY_AUTHENTICATED,
    AUTH_BLOCKED,
    AUTH_BUSY,
    AUTH_CANCELLED,
    AUTH_FAILED,
    AUTH_NEEDS_TLS,
    AUTH_NOT_ENABLED,
    AUTH_OK,
    AUTH_TEMP_FAILURE,
    AUTH_UNDECODABLE,
    AUTH_UNKNOWN_MECHANISM,
    IN_TRANSACTION,
    syntax,
)
from smtpbridge.secret import Secret
from smtpbridge.serverbase import Outcome, ServerSession

#: Verbs that, sent as the answer to an AUTH challenge, show a client that did not wait
#: for the challenge.  Only these words are logged of such an answer.
_COMMAND_VERBS = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT",
                            "AUTH", "STARTTLS", "HELP", "VRFY"})

#: SASL mechanisms a client may name (from IANA's registry, those seen in mail): only
#: these names are logged; anything else a client sends as a mechanism might be a secret.
_KNOWN_MECHANISMS = frozenset({
    "PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "NTLM", "GSSAPI", "GSS-SPNEGO", "EXTERNAL",
    "ANONYMOUS", "XOAUTH", "XOAUTH2", "OAUTHBEARER", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "KERBEROS_V4", "SKEY", "OTP", "SRP", "MSN"})


def _mechanism(name: str) -> str:
    """A mechanism name as it may be logged."""
    return name.upper() if name.upper() in _KNOWN_MECHANISMS else "(a name not shown)"


class AuthCommands(ServerSession):
    """The AUTH command of L{smtpbridge.server.SMTPServerProtocol}."""

    def _auth_offered(self) -> bool:
        return self.services.checker is not None and (
            self._tls_active or self.settings.allow_plaintext_auth)

    def smtp_AUTH(self, argument: str) -> Outcome:  # noqa: N802
        mechanism, _, initial = argument.partition(" ")
        if self.services.checker is None:
            self.note("AUTH {mechanism} refused: no users to log in to on listener "
                      "{listener}", mechanism=_mechanism(mechanism), listener=self.settings.name)
            return AUTH_NOT_ENABLED
        if not self._tls_active and not self.settings.allow_plaintext_auth:
            self.note("AUTH {mechanism} refused: before TLS on listener {listener} (the "
                      "client must use STARTTLS first)", mechanism=_mechanism(mechanism),
                      listener=self.settings.name)
            return AUTH_NEEDS_TLS
        refusal = self.before_helo("AUTH")
        if refusal is not None:
            return refusal
        if self.client.login is not None:
            return ALREADY_AUTHENTICATED
        if self._transaction is not None:
            return IN_TRANSACTION
        if not mechanism:
            return syntax("AUTH mechanism")
        try:
            exchange = sasl.ServerExchange(mechanism, initial)
        except sasl.UnknownMechanism:
            self.note("AUTH refused: unknown mechanism {mechanism}; the bridge offers "
                      "{offered}", mechanism=_mechanism(mechanism),
                      offered=" ".join(sasl.SERVER_MECHANISMS))
            return AUTH_UNKNOWN_MECHANISM
        return self._auth_step(exchange, exchange.start)

    def _auth_step(self, exchange: sasl.ServerExchange,
                   step: Callable[..., sasl.Challenge | sasl.Credentials],
                   *args: str) -> Outcome:
        """Run one step of an AUTH exchange: a challenge to send, or credentials to check."""
        try:
            result = step(*args)
        except sasl.SASLCancelled:
            return AUTH_CANCELLED
        except sasl.SASLError:
            return AUTH_UNDECODABLE
        if isinstance(result, sasl.Challenge):
            self._continuation = lambda line: self._auth_answer(exchange, line)
            self.send(b"334 " + result.text.encode("ascii") + b"\r\n")
            return None
        return self._authenticate(result.username, result.password, exchange.mechanism)

    def _auth_answer(self, exchange: sasl.ServerExchange, line: str) -> Outcome:
        """The client's answer to a challenge; one that looks like a command is logged (a
        client that sent its next command without waiting for the 334)."""
        verb = line.partition(" ")[0].upper()
        if verb in _COMMAND_VERBS:
            self.note("AUTH {mechanism}: the answer to the challenge looks like a {verb} "
                      "command; the client did not wait for the 334 reply",
                      mechanism=exchange.mechanism, verb=verb)
        return self._auth_step(exchange, exchange.respond, line)

    def _authenticate(self, username: str, password: str,
                      mechanism: str) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._check_login(username, password, mechanism))

    async def _check_login(self, username: str, password: str, mechanism: str) -> Reply:
        """Check a login; failures are slowed down and, repeated, blocked per address."""
        session, host = self.client.session_id, self.client.peer_host
        throttle, checker = self.services.throttle, self.services.checker
        assert checker is not None, "AUTH is refused without a checker"
        cheap = IVerifiedLogins.providedBy(checker) and checker.remembers(username, password)
        refused = throttle.begin(host, costly=not cheap) if throttle is not None else None
        if refused is not None:
            self.log.info("{session} AUTH refused: {why}", session=session, why={
                "blocked": f"[{host}] is blocked after repeated failures",
                "busy": f"[{host}] has too many logins under way",
                "rate": "the bridge's ceiling of AUTH attempts per second"}[refused])
            self._auth_counted(refused)
            return AUTH_BLOCKED if refused == "blocked" else AUTH_BUSY
        try:
            ok = await maybeDeferred(checker.check, username, password)
        except Exception as e:
            if throttle is not None:
                throttle.end(host, ok=None)  # no verdict on the password
            if isinstance(e, SMTPReplyError):
                self.log.warn("{session} password check failed: {text}", session=session,
                              text=e.reply.text)
            else:
                self.log.failure("{session} password check failed", Failure(),
                                 session=session)
            self._auth_counted("error")
            return AUTH_TEMP_FAILURE
        delay = throttle.end(host, ok) if throttle is not None else 0.0
        if not ok:
            self.log.info("{session} AUTH failed for user {user!r} from [{host}] ({mechanism})",
                          session=session, user=username, host=host, mechanism=mechanism)
            self._auth_counted("failed")
            if throttle is not None:
                await throttle.delay(delay)
            return AUTH_FAILED
        kept = Secret(password) if self.services.keep_password else None
        self.client = attr.evolve(self.client, login=username, password=kept)
        self.log.info("{session} AUTH ok: user {user!r} ({mechanism})", session=session,
                      user=username, mechanism=mechanism)
        self._auth_counted("ok")
        return AUTH_OK

    def _auth_counted(self, result: str) -> None:
        if self.services.statistics is not None:
            self.services.statistics.auth(self.settings.name, result)
