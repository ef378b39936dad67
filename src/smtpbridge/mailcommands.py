"""MAIL, RCPT, DATA and the message body of a downstream session.

The transaction is the delivery's L{ITransaction}; the body is decoded line by line
(L{DataDecoder}) and handed over as it comes, with the client paused whenever the
delivery cannot take it as fast (back-pressure).
"""

from __future__ import annotations

import datetime

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import IReportingTransaction, ITransaction
from smtpbridge.model import MessageOutcome, Reply, status_for
from smtpbridge.replies import (
    BAD_BODY,
    BAD_SIZE,
    INTERNAL_ERROR,
    NEED_MAIL,
    NEED_RCPT,
    NEEDS_SMTPUTF8,
    NESTED_MAIL,
    NO_VALID_RECIPIENTS,
    TOO_BIG,
    TOO_MANY_RECIPIENTS,
    syntax,
    unsupported,
)
from smtpbridge.serverbase import ServerSession, SessionServices
from smtpbridge.summary import MessageSummary, log_summary
from smtpbridge.trace import received_header
from smtpbridge.wire import DataDecoder, parse_mail_from, parse_rcpt_to


@implementer(IPushProducer)
class _BodyInput:
    """Lets a slow delivery pause the client's body without touching the reply holds.

    It speaks for one transaction's body only: once the final dot has come (or the
    transaction is over), a pause or resume from the delivery does nothing.  The
    upstream may still pause its producer while the rest of the message goes out after
    the dot, and no resume follows once the body producer is unregistered: that pause
    must not hold the session's next command (nor a later transaction's body) for good.
    """

    def __init__(self, session: MailCommands, transaction: ITransaction) -> None:
        self._session = session
        self._transaction = transaction

    def pauseProducing(self) -> None:  # noqa: N802
        if self._session.receiving_body(self._transaction):
            self._session.hold("body")

    def resumeProducing(self) -> None:  # noqa: N802
        if self._session.receiving_body(self._transaction):
            self._session.release("body")

    def stopProducing(self) -> None:  # noqa: N802
        self.resumeProducing()


class MailCommands(ServerSession):
    """The mail transaction of L{smtpbridge.server.SMTPServerProtocol}."""

    def __init__(self, factory: SessionServices) -> None:
        super().__init__(factory)
        self._recipients = 0
        self._accepted: list[str] = []
        self._decoder: DataDecoder | None = None
        self._size = 0
        self._progress = 0  # body bytes since the idle deadline last restarted
        self._smtputf8 = False  # the transaction's MAIL FROM said SMTPUTF8
        self._body_refusal: Reply | None = None
        self._opening = False  # the next body line is the first, after our Received:
        self._sender = ""
        self._started = 0.0  # when MAIL came
        self._waited = 0.0  # seconds since then spent waiting on the delivery

    def smtp_MAIL(self, argument: str) -> Reply | Deferred[Reply]:  # noqa: N802
        refusal = self.before_helo("MAIL")
        if refusal is not None:
            return refusal
        if self._transaction is not None:
            return NESTED_MAIL
        sender, params = parse_mail_from(argument)
        policy = self.services.policy
        refusal = (policy.may_submit(self.client, self.settings.auth_required)
                   or policy.may_send_as(self.client, sender))
        if refusal is not None:
            self.note("MAIL from <{sender}> refused: {text}", sender=sender, text=refusal.text)
            return refusal
        params = self._mail_params(params)
        if not sender.isascii() and "SMTPUTF8" not in params:
            return NEEDS_SMTPUTF8  # RFC 6531 3.5: never a silent downgrade
        self._smtputf8 = "SMTPUTF8" in params
        transaction = self.services.delivery.transaction(self.client)
        self._transaction, self._recipients, self._accepted = transaction, 0, []
        self._sender, self._started, self._waited = sender, self.services.clock.seconds(), 0.0

        def answered(reply: Reply) -> Reply:
            if not reply.positive:
                self._summarize(transaction, reply)
                self._end_transaction(abort=True, only=transaction)
            return reply

        def failed(failure: Failure) -> Failure:
            self._summarize(transaction, failure)
            self._end_transaction(abort=True, only=transaction)
            return failure

        return self._timed(maybeDeferred(transaction.mail, sender, params)).addCallbacks(
            answered, failed)

    def _mail_params(self, params: dict[str, str | None]) -> dict[str, str | None]:
        """Check MAIL parameters; AUTH= (RFC 4954) is accepted and not passed on."""
        checked: dict[str, str | None] = {}
        for name, value in params.items():
            if name == "SIZE":
                if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                    raise SMTPReplyError(BAD_SIZE)
                if int(value) > self.settings.max_message_size:
                    self.note("MAIL refused: SIZE={size} is over the limit of {limit} bytes",
                              size=int(value), limit=self.settings.max_message_size)
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

    def smtp_RCPT(self, argument: str) -> Reply | Deferred[Reply]:  # noqa: N802
        transaction = self._transaction
        if transaction is None:
            return NEED_MAIL
        recipient, params = parse_rcpt_to(argument)
        for name in params:
            raise SMTPReplyError(unsupported(name))
        if not recipient.isascii() and not self._smtputf8:
            return NEEDS_SMTPUTF8
        if self._recipients >= self.settings.max_recipients:
            return TOO_MANY_RECIPIENTS
        self._recipients += 1

        def answered(reply: Reply) -> Reply:
            if reply.positive and self._transaction is transaction:
                self._accepted.append(recipient)
            return reply

        return self._timed(maybeDeferred(transaction.rcpt, recipient, params)).addCallback(
            answered)

    def smtp_DATA(self, argument: str) -> Reply | Deferred[Reply]:  # noqa: N802
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
                self._start_body(transaction)
            else:
                self._summarize(transaction, reply)
                self._end_transaction(abort=True)
            return reply

        def failed(failure: Failure) -> Failure:
            if self._transaction is transaction:
                self._summarize(transaction, failure)
            self._end_transaction(abort=True, only=transaction)
            return failure

        body = _BodyInput(self, transaction)
        return self._timed(maybeDeferred(transaction.data, body)).addCallbacks(answered, failed)

    def _start_body(self, transaction: ITransaction) -> None:
        self._decoder = DataDecoder(accept_bare_lf_end=self.settings.accept_bare_lf_end)
        self._size = self._progress = 0
        self._body_refusal = None
        self.setRawMode()
        self._opening = self.settings.received_header
        if self.settings.received_header:
            now = datetime.datetime.fromtimestamp(self.services.clock.seconds(), datetime.UTC)
            transaction.write(received_header(
                self.client, self.settings.hostname, self._accepted, now,
                esmtp=self.client.esmtp, show_login=self.settings.received_header_login))

    def raw_data_received(self, data: bytes) -> None:
        decoder, transaction = self._decoder, self._transaction
        if decoder is None or transaction is None:  # the session ended meanwhile
            return
        # A trickle of bytes does not keep the session alive: each data_progress bytes
        # must come within idle_timeout.
        self._progress += len(data)
        if self._progress >= self.settings.data_progress:
            self._progress = 0
            self.idle.start()
        lines, rest = decoder.feed(data)
        if lines and self._body_refusal is None:
            self._size += sum(map(len, lines)) + 2 * len(lines)
            if self._size > self.settings.max_message_size:
                self._body_refusal = TOO_BIG
                transaction.abort()
            else:
                if self._opening:
                    self._opening = False
                    if lines[0][:1] in (b" ", b"\t"):  # it would fold into Received:
                        lines = [b"", *lines]  # (so no header section, as Postfix does)
                transaction.write(lines)
        if rest is not None:
            self._end_of_data(transaction, decoder.size, rest)

    def _end_of_data(self, transaction: ITransaction, size: int, rest: bytes) -> None:
        """The message is complete: C{size} bytes as the client sent them (its SIZE), which
        folding and bare LFs may have changed on the way upstream."""
        refusal, recipients = self._body_refusal, tuple(self._accepted)
        self._transaction = self._decoder = None
        self._recipients, self._accepted = 0, []
        self.release("body")
        self._last_command = "end of message"
        relayed = self._size
        if refusal is not None:
            self._summarize(transaction, refusal, size, recipients, relayed)
            self.reply(refusal)
        else:
            def logged(result: Reply | Failure) -> Reply | Failure:
                self._summarize(transaction, result, size, recipients, relayed)
                return result

            self._respond(self._timed(maybeDeferred(transaction.finish)).addBoth(logged))
        self.setLineMode(rest)

    def _timed(self, step: Deferred[Reply]) -> Deferred[Reply]:
        """C{step}, its wait counted as time spent on the delivery (not on the client)."""
        clock, started = self.services.clock, self.services.clock.seconds()

        def done(result: Reply | Failure) -> Reply | Failure:
            self._waited += clock.seconds() - started
            return result

        return step.addBoth(done)

    def _summarize(self, transaction: ITransaction, result: Reply | Failure, size: int = 0,
                   recipients: tuple[str, ...] | None = None, relayed: int | None = None,
                   ) -> None:
        """Log the summary line of a message the delivery gave its verdict on (and tell
        the statistics)."""
        if isinstance(result, Failure):
            error = result.value
            reply = error.reply if isinstance(error, SMTPReplyError) else INTERNAL_ERROR
        else:
            reply = result
        outcome = None
        if IReportingTransaction.providedBy(transaction):
            outcome = transaction.outcome
        if outcome is None:
            outcome = MessageOutcome(status_for(reply))
        total = max(self.services.clock.seconds() - self._started, 0.0)
        waited = min(self._waited, total)
        client = self.client
        summary = MessageSummary(
            client.session_id, client.peer_host, client.peer_port, client.listener,
            client.login, self._sender,
            tuple(self._accepted) if recipients is None else recipients, size, reply,
            outcome, total - waited,
            waited if outcome.upstream_time is None else outcome.upstream_time,
            relayed if relayed != size else None)
        log_summary(summary, self.services.log)
        statistics = self.services.statistics
        if statistics is not None:
            statistics.message(summary)

    def receiving_body(self, transaction: ITransaction) -> bool:
        """Whether C{transaction} is this session's and its body has not ended yet (its
        DATA is pending or the body is coming in)."""
        return self._transaction is transaction

    def phase(self) -> str:
        if self._decoder is not None:
            return f"DATA ({self._decoder.size} bytes received)"
        return super().phase()

    def _end_transaction(self, abort: bool, only: ITransaction | None = None) -> None:
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
