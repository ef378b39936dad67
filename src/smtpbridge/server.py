"""The downstream SMTP server: the state machine every legacy client talks to.

Replies leave in the order the commands came, even when one waits on a
Deferred: input is held until the reply is out (RFC 2920).  After STARTTLS
everything the client sent ahead is thrown away (RFC 3207, CVE-2011-0411).
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge import sasl
from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import IAccessPolicy, IDelivery, IPasswordChecker, ITransaction
from smtpbridge.lines import SMTPLineReceiver
from smtpbridge.model import ClientInfo, Reply
from smtpbridge.replies import (
    BAD_BODY,
    BAD_SIZE,
    BYE,
    HELP_REPLY,
    INTERNAL_ERROR,
    LINE_TOO_LONG,
    NEED_HELO,
    NEED_MAIL,
    NEED_RCPT,
    NESTED_MAIL,
    NO_VALID_RECIPIENTS,
    NOT_IMPLEMENTED,
    NOT_RECOGNIZED,
    OK,
    READY_FOR_TLS,
    TLS_ACTIVE,
    TOO_BIG,
    TOO_MANY_RECIPIENTS,
    VRFY_REPLY,
    syntax,
    unsupported,
)
from smtpbridge.serverauth import AuthCommands
from smtpbridge.throttle import AuthThrottle
from smtpbridge.tls import ServerTLS, connection_summary, peer_fingerprint
from smtpbridge.trace import received_header
from smtpbridge.wire import (
    DataDecoder,
    format_reply,
    parse_command,
    parse_mail_from,
    parse_rcpt_to,
)

log = Logger()

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


class SMTPServerFactory(Factory):
    """Builds one L{SMTPServerProtocol} per connection of a listener."""

    noisy = False

    def __init__(self, settings: ListenerSettings, delivery: IDelivery, policy: IAccessPolicy,
                 checker: IPasswordChecker | None, clock: IReactorTime,
                 tls: ServerTLS | None = None, throttle: AuthThrottle | None = None,
                 keep_password: bool = False) -> None:
        self.settings = settings
        self.delivery = delivery
        self.policy = policy
        self.checker = checker
        self.clock = clock
        self.tls = tls
        self.throttle = throttle
        self.keep_password = keep_password  # passthrough needs the login's password

    def buildProtocol(self, addr: object) -> SMTPServerProtocol:  # noqa: N802
        protocol = SMTPServerProtocol(self)
        protocol.factory = self
        return protocol


@implementer(IPushProducer)
class _BodyInput:
    """Lets a slow delivery pause the client's body without touching the reply holds."""

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:  # noqa: N802
        self._protocol.hold("body")

    def resumeProducing(self) -> None:  # noqa: N802
        self._protocol.release("body")

    def stopProducing(self) -> None:  # noqa: N802
        self._protocol.release("body")


@implementer(IHandshakeListener)
class SMTPServerProtocol(AuthCommands, SMTPLineReceiver, TimeoutMixin):
    """One client session."""

    MAX_LENGTH = 12288  # room for AUTH responses (RFC 4954); commands are far shorter

    def __init__(self, factory: SMTPServerFactory) -> None:
        super().__init__()
        self.factory = factory
        self.settings = factory.settings
        self.callLater = factory.clock.callLater
        self.client = ClientInfo("", 0, self.settings.name, secrets.token_hex(6))
        self._tls_active = self.settings.tls == "implicit"
        self._continuation: Callable[[str], Any] | None = None
        self._transaction: ITransaction | None = None
        self._recipients = 0
        self._accepted: list[str] = []
        self._decoder: DataDecoder | None = None
        self._size = 0
        self._body_refusal: Reply | None = None
        self._errors = 0
        self._gone = False

    # Connection events.

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        self.client = attr.evolve(self.client, peer_host=str(getattr(peer, "host", peer)),
                                  peer_port=int(getattr(peer, "port", 0) or 0))
        log.info("{session} connect from [{host}]:{port} on listener {listener}",
                 session=self.client.session_id, host=self.client.peer_host,
                 port=self.client.peer_port, listener=self.settings.name)
        self.setTimeout(self.settings.idle_timeout)
        self.reply(Reply(220, None, f"{self.settings.hostname} ESMTP smtpbridge"))

    def handshakeCompleted(self) -> None:  # noqa: N802
        version, cipher = connection_summary(self.transport)
        certificate = peer_fingerprint(self.transport)
        self.client = attr.evolve(self.client, tls_version=version, tls_cipher=cipher,
                                  certificate=certificate)
        log.info("{session} TLS established: {version} {cipher}{certificate}",
                 session=self.client.session_id, version=version, cipher=cipher,
                 certificate=f", client certificate {certificate}" if certificate else "")

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self._gone = True
        self.setTimeout(None)
        self._end_transaction(abort=True)
        log.info("{session} disconnect from [{host}]", session=self.client.session_id,
                 host=self.client.peer_host)

    def timeoutConnection(self) -> None:  # noqa: N802
        log.info("{session} idle timeout", session=self.client.session_id)
        self.reply(Reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))
        self._end_transaction(abort=True)
        self.transport.loseConnection()

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

    # Replies.

    def reply(self, reply: Reply) -> None:
        """Send one reply; too many errors end the session as Postfix does."""
        if self._gone:
            return
        self.transport.write(format_reply(reply))
        if reply.code >= 400:
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                self.transport.write(format_reply(
                    Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many errors")))
                self._end_transaction(abort=True)
                self.transport.loseConnection()

    def _respond(self, result: Reply | Deferred | None) -> None:
        """Send the reply a handler produced, holding input while it is not ready."""
        if not isinstance(result, Deferred):
            if result is not None:
                self.reply(result)
            return
        state = {"done": False}

        def send(reply: Reply) -> None:
            state["done"] = True
            self.reply(reply)
            self.release("reply")

        result.addErrback(self._failure_reply)
        result.addCallback(send)
        if not state["done"]:
            self.hold("reply")

    def _failure_reply(self, failure: Failure) -> Reply:
        if failure.check(SMTPReplyError):
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
        handler = getattr(self, f"smtp_{command.verb}", None)
        if handler is None:
            self.reply(NOT_RECOGNIZED)
            return
        self._respond(self._guarded(handler, command.argument))

    def _guarded(self, handler: Callable[[str], Any], argument: str) -> Reply | Deferred | None:
        try:
            return handler(argument)
        except SMTPReplyError as e:
            return e.reply
        except Exception:
            return self._failure_reply(Failure())

    def line_too_long(self) -> None:
        self.reply(LINE_TOO_LONG)

    # Session commands.

    def _greet(self, argument: str, usage: str, esmtp: bool) -> None:
        if not argument:
            raise SMTPReplyError(syntax(usage))
        self._end_transaction(abort=True)
        self.client = attr.evolve(self.client, helo=argument.split()[0], esmtp=esmtp)

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
        if self.settings.tls == "none" or self.factory.tls is None:
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
        self.transport.startTLS(self.factory.tls)
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
        self.reply(BYE)
        self._end_transaction(abort=True)
        self.transport.loseConnection()

    smtp_EXPN = smtp_BDAT = smtp_ETRN = smtp_TURN = lambda self, argument: NOT_IMPLEMENTED  # noqa: E731, N815

    # The mail transaction.

    def smtp_MAIL(self, argument: str) -> Reply | Deferred:  # noqa: N802
        if self.client.helo is None:
            return NEED_HELO
        if self._transaction is not None:
            return NESTED_MAIL
        sender, params = parse_mail_from(argument)
        refusal = (self.factory.policy.may_submit(self.client, self.settings.auth_required)
                   or self.factory.policy.may_send_as(self.client, sender))
        if refusal is not None:
            log.info("{session} MAIL from <{sender}> refused: {text}",
                     session=self.client.session_id, sender=sender, text=refusal.text)
            return refusal
        params = self._mail_params(params)
        transaction = self.factory.delivery.transaction(self.client)
        self._transaction, self._recipients, self._accepted = transaction, 0, []

        def answered(reply: Reply) -> Reply:
            if not reply.positive:
                self._end_transaction(abort=True, only=transaction)
            return reply

        def failed(failure: Failure) -> Failure:
            self._end_transaction(abort=True, only=transaction)
            return failure

        return maybeDeferred(transaction.mail, sender, params).addCallbacks(answered, failed)

    def _mail_params(self, params: dict[str, str | None]) -> dict[str, str | None]:
        """Check MAIL parameters; AUTH= (RFC 4954) is accepted and not passed on."""
        checked: dict[str, str | None] = {}
        for name, value in params.items():
            if name == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise SMTPReplyError(BAD_SIZE)
                if int(value) > self.settings.max_message_size:
                    raise SMTPReplyError(TOO_BIG)
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPReplyError(BAD_BODY)
                value = value.upper()
            elif name == "SMTPUTF8":
                if value is not None:
                    raise SMTPReplyError(syntax("SMTPUTF8 takes no value"))
            elif name == "AUTH":
                continue
            else:
                raise SMTPReplyError(unsupported(name))
            checked[name] = value
        return checked

    def smtp_RCPT(self, argument: str) -> Reply | Deferred:  # noqa: N802
        transaction = self._transaction
        if transaction is None:
            return NEED_MAIL
        recipient, params = parse_rcpt_to(argument)
        for name in params:
            raise SMTPReplyError(unsupported(name))
        if self._recipients >= self.settings.max_recipients:
            return TOO_MANY_RECIPIENTS
        self._recipients += 1

        def answered(reply: Reply) -> Reply:
            if reply.positive and self._transaction is transaction:
                self._accepted.append(recipient)
            return reply

        return maybeDeferred(transaction.rcpt, recipient, params).addCallback(answered)

    def smtp_DATA(self, argument: str) -> Reply | Deferred:  # noqa: N802
        transaction = self._transaction
        if argument:
            return syntax("DATA")
        if transaction is None:
            return NEED_MAIL
        if self._recipients == 0:
            return NEED_RCPT
        if not self._accepted:
            return NO_VALID_RECIPIENTS

        def answered(reply: Reply) -> Reply:
            if self._transaction is not transaction:
                return reply
            if reply.code == 354:
                self._decoder = DataDecoder(accept_bare_lf_end=self.settings.accept_bare_lf_end)
                self._size = 0
                self._body_refusal = None
                self.setRawMode()
                if self.settings.received_header:
                    now = datetime.datetime.fromtimestamp(self.factory.clock.seconds(),
                                                          datetime.UTC)
                    transaction.write(received_header(self.client, self.settings.hostname,
                                                      self._accepted, now,
                                                      esmtp=self.client.esmtp))
            else:
                self._end_transaction(abort=True)
            return reply

        def failed(failure: Failure) -> Failure:
            self._end_transaction(abort=True, only=transaction)
            return failure

        return maybeDeferred(transaction.data, _BodyInput(self)).addCallbacks(answered, failed)

    def raw_data_received(self, data: bytes) -> None:
        decoder, transaction = self._decoder, self._transaction
        if decoder is None or transaction is None:  # the session ended meanwhile
            return
        lines, rest = decoder.feed(data)
        if lines and self._body_refusal is None:
            self._size += sum(map(len, lines)) + 2 * len(lines)
            if self._size > self.settings.max_message_size:
                self._body_refusal = TOO_BIG
                transaction.abort()
            else:
                transaction.write(lines)
        if rest is not None:
            self._end_of_data(transaction, rest)

    def _end_of_data(self, transaction: ITransaction, rest: bytes) -> None:
        refusal = self._body_refusal
        self._transaction = self._decoder = None
        self._recipients, self._accepted = 0, []
        self.release("body")
        if refusal is not None:
            log.info("{session} message refused: {text}", session=self.client.session_id,
                     text=refusal.text)
            self.reply(refusal)
        else:
            size, session = self._size, self.client.session_id

            def logged(reply: Reply) -> Reply:
                log.info("{session} message of {size} bytes: {code} {text}", session=session,
                         size=size, code=reply.code, text=reply.text)
                return reply

            self._respond(maybeDeferred(transaction.finish).addCallback(logged))
        self.setLineMode(rest)

    def _end_transaction(self, abort: bool, only: ITransaction | None = None) -> None:
        """Forget the current transaction (if it is C{only}, when given), aborting it."""
        transaction = self._transaction
        if transaction is None or (only is not None and transaction is not only):
            return
        self._transaction = self._decoder = None
        self._recipients, self._accepted = 0, []
        if not self.line_mode:
            self.setLineMode()
        self.release("body")
        if abort:
            transaction.abort()
