"""AUTH for downstream clients (RFC 4954): PLAIN and LOGIN, with or without an initial
response, never before TLS unless a listener allows it; failures slowed and blocked."""

from __future__ import annotations

from collections.abc import Callable

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
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
    NEED_HELO,
    syntax,
)
from smtpbridge.secret import Secret
from smtpbridge.serverbase import Outcome, ServerSession

log = Logger()


class AuthCommands(ServerSession):
    """The AUTH command of L{smtpbridge.server.SMTPServerProtocol}."""

    def _auth_offered(self) -> bool:
        return self.services.checker is not None and (
            self._tls_active or self.settings.allow_plaintext_auth)

    def smtp_AUTH(self, argument: str) -> Outcome:  # noqa: N802
        if self.services.checker is None:
            return AUTH_NOT_ENABLED
        if not self._tls_active and not self.settings.allow_plaintext_auth:
            return AUTH_NEEDS_TLS
        if self.client.helo is None:
            return NEED_HELO
        if self.client.login is not None:
            return ALREADY_AUTHENTICATED
        if self._transaction is not None:
            return IN_TRANSACTION
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            return syntax("AUTH mechanism")
        try:
            exchange = sasl.ServerExchange(mechanism, initial)
        except sasl.UnknownMechanism:
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
            self._continuation = lambda line: self._auth_step(exchange, exchange.respond, line)
            self.connection.write(b"334 " + result.text.encode("ascii") + b"\r\n")
            return None
        return self._authenticate(result.username, result.password)

    def _authenticate(self, username: str, password: str) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._check_login(username, password))

    async def _check_login(self, username: str, password: str) -> Reply:
        """Check a login; failures are slowed down and, repeated, blocked per address."""
        session, host = self.client.session_id, self.client.peer_host
        throttle, checker = self.services.throttle, self.services.checker
        assert checker is not None, "AUTH is refused without a checker"
        cheap = IVerifiedLogins.providedBy(checker) and checker.remembers(username, password)
        refused = throttle.begin(host, costly=not cheap) if throttle is not None else None
        if refused is not None:
            log.info("{session} AUTH refused: {why}", session=session, why={
                "blocked": f"[{host}] is blocked after repeated failures",
                "busy": f"[{host}] has too many logins under way",
                "rate": "the bridge's ceiling of AUTH attempts per second"}[refused])
            return AUTH_BLOCKED if refused == "blocked" else AUTH_BUSY
        try:
            ok = await maybeDeferred(checker.check, username, password)
        except Exception as e:
            if throttle is not None:
                throttle.end(host, ok=None)  # no verdict on the password
            if isinstance(e, SMTPReplyError):
                log.warn("{session} password check failed: {text}", session=session,
                         text=e.reply.text)
            else:
                log.failure("{session} password check failed", Failure(), session=session)
            return AUTH_TEMP_FAILURE
        delay = throttle.end(host, ok) if throttle is not None else 0.0
        if not ok:
            log.info("{session} AUTH failed for user {user!r} from [{host}]",
                     session=session, user=username, host=host)
            if throttle is not None:
                await throttle.delay(delay)
            return AUTH_FAILED
        kept = Secret(password) if self.services.keep_password else None
        self.client = attr.evolve(self.client, login=username, password=kept)
        log.info("{session} AUTH ok: user {user!r}", session=session, user=username)
        return AUTH_OK
