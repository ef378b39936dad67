"""The core of a downstream session: replies in order, input held while one is pending,
commands dispatched, errors counted, the idle timeout.

Replies leave in the order the commands came, even when one waits on a Deferred:
input is held until the reply is out (RFC 2920).  The commands themselves are in
L{smtpbridge.server} (session), L{smtpbridge.serverauth} (AUTH) and
L{smtpbridge.mailcommands} (MAIL, RCPT, DATA).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Protocol

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import IAccessPolicy, IDelivery, IPasswordChecker, ITransaction
from smtpbridge.lines import SMTPLineReceiver
from smtpbridge.model import ClientInfo, Reply
from smtpbridge.replies import INTERNAL_ERROR, LINE_TOO_LONG, NOT_RECOGNIZED
from smtpbridge.throttle import AuthThrottle
from smtpbridge.tls import ServerTLS
from smtpbridge.wire import format_reply, parse_command

log = Logger()

#: What a handler gives: a reply now, a Deferred reply, or None (it answered itself).
Outcome = Reply | Deferred[Reply] | None


@attr.frozen
class ListenerSettings:
    """What one listener promises its clients."""

    name: str
    hostname: str
    tls: str = "none"  # implicit | starttls | none
    auth_required: bool = True
    allow_plaintext_auth: bool = False
    accept_bare_lf_end: bool = False
    max_message_size: int = 36_700_160
    idle_timeout: int = 300
    max_recipients: int = 1000
    max_errors: int = 20
    received_header: bool = True


class SessionServices(Protocol):
    """What a session uses of its listener's factory (read at each use, so a test may
    swap one)."""

    settings: ListenerSettings
    delivery: IDelivery
    policy: IAccessPolicy
    checker: IPasswordChecker | None
    clock: IReactorTime
    tls: ServerTLS | None
    throttle: AuthThrottle | None
    keep_password: bool  # passthrough needs the login's password


class ServerSession(SMTPLineReceiver, TimeoutMixin):
    """One client session: the reply and dispatch machinery its commands share."""

    MAX_LENGTH = 12288  # room for AUTH responses (RFC 4954); commands are far shorter

    def __init__(self, factory: SessionServices) -> None:
        super().__init__()
        self.services = factory
        self.settings = factory.settings
        self._clock = factory.clock
        self.client = ClientInfo("", 0, self.settings.name, secrets.token_hex(6))
        self._tls_active = self.settings.tls == "implicit"
        self._continuation: Callable[[str], Outcome] | None = None
        self._transaction: ITransaction | None = None
        self._errors = 0
        self._gone = False

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:  # noqa: N802
        """TimeoutMixin's timer, on the clock the session was given."""
        return self._clock.callLater(period, func)

    def _end_transaction(self, abort: bool, only: ITransaction | None = None) -> None:
        """Forget the current transaction (if it is C{only}, when given), aborting it."""

    # Timeouts and holding input.

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.resetTimeout()
        super().dataReceived(data)

    def hold(self, reason: str) -> None:
        if not self.held:
            self.setTimeout(None)  # waiting on us is not the client being idle
        super().hold(reason)

    def release(self, reason: str) -> None:
        super().release(reason)
        if not self.held and not self._gone:
            self.setTimeout(self.settings.idle_timeout)

    def timeoutConnection(self) -> None:  # noqa: N802
        log.info("{session} idle timeout", session=self.client.session_id)
        self.reply(Reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))
        self._end_transaction(abort=True)
        self.connection.loseConnection()

    # Replies.

    def reply(self, reply: Reply) -> None:
        """Send one reply; too many errors end the session as Postfix does."""
        if self._gone:
            return
        self.connection.write(format_reply(reply))
        if reply.code >= 400:
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                self.connection.write(format_reply(
                    Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many errors")))
                self._end_transaction(abort=True)
                self.connection.loseConnection()

    def _respond(self, result: Outcome) -> None:
        """Send the reply a handler produced, holding input while it is not ready."""
        if not isinstance(result, Deferred):
            if result is not None:
                self.reply(result)
            return
        done = False

        def send(reply: Reply) -> None:
            nonlocal done
            done = True
            self.reply(reply)
            self.release("reply")

        result.addErrback(self._failure_reply)
        result.addCallback(send)
        if not done:
            self.hold("reply")

    def _failure_reply(self, failure: Failure) -> Reply:
        if isinstance(failure.value, SMTPReplyError):
            return failure.value.reply
        log.failure("{session} internal error", failure, session=self.client.session_id)
        return INTERNAL_ERROR

    # Command dispatch.

    def line_received(self, line: bytes) -> None:
        if self._continuation is not None:
            continuation, self._continuation = self._continuation, None
            self._respond(self._guarded(continuation, line.decode("ascii", "replace")))
            return
        try:
            command = parse_command(line)
        except SMTPReplyError as e:
            self.reply(e.reply)
            return
        handler: Callable[[str], Outcome] | None = getattr(self, f"smtp_{command.verb}", None)
        if handler is None:
            self.reply(NOT_RECOGNIZED)
            return
        self._respond(self._guarded(handler, command.argument))

    def _guarded(self, handler: Callable[[str], Outcome], argument: str) -> Outcome:
        try:
            return handler(argument)
        except SMTPReplyError as e:
            return e.reply
        except Exception:
            return self._failure_reply(Failure())

    def line_too_long(self) -> None:
        self.reply(LINE_TOO_LONG)

    def raw_data_received(self, data: bytes) -> None:
        """Raw mode is only used for a message body (L{smtpbridge.mailcommands})."""

