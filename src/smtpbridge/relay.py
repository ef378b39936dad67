"""Delivery: each transaction is carried out upstream while the client waits, with the
spool as the safety net when the upstream cannot take the message now.

The client hears the upstream's own replies to MAIL, RCPT and the final dot (DATA gets the
bridge's 354 once DATA went upstream; a refusal of DATA comes at the final dot), so the
bridge never says 250 to a message the upstream has not taken, unless the message is in
the spool, fsynced: then the client hears ``250 2.0.0 Ok: queued as <id>``.  That happens
(spool mode "fallback") when the upstream cannot be reached or set up before MAIL FROM,
answers MAIL, DATA or the final dot with 4xx, or is lost; a recipient it refuses with 4xx
is spooled alone.  A 5xx passes through.  Mode "always" spools every message first; in
mode "never" the upstream's verdict is all there is.  The body streams through with
back-pressure; a client gone in the middle of DATA ends the upstream without a final dot.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.bodyfilter import BodyFilter
from smtpbridge.connector import connect_first
from smtpbridge.earlybody import EarlyBody
from smtpbridge.errors import SMTPReplyError, UpstreamError
from smtpbridge.interfaces import (
    ICredentialMapper,
    IDelivery,
    IReportingTransaction,
    IUpstreamConnector,
    IUpstreamSession,
    Params,
)
from smtpbridge.model import ClientInfo, MessageOutcome, Reply, UpstreamAccount
from smtpbridge.ratelimit import Quota, RateLimits
from smtpbridge.record import TransactionRecord
from smtpbridge.replies import (
    RECIPIENT_OK,
    SENDER_OK,
    SPOOL_FULL,
    START_DATA,
    UPSTREAM_NO_SMTPUTF8,
)
from smtpbridge.spoolfile import SafetyNet, SpoolWriter

log = Logger()

GONE = Reply(451, "4.3.0", "Upstream session is no longer available")


@implementer(IReportingTransaction)
class InlineTransaction(TransactionRecord):
    """One transaction: relayed to one upstream session, or spooled.

    C{net} is the spool (None: mode "never"); C{always} spools every message that can
    be spooled without asking the upstream first (mode "always"); C{limits} are the rate
    limits a message is counted against.  C{outcome} says how the message ended (sent,
    refused, deferred or spooled), by which account, route and upstream.
    """

    def __init__(self, mapper: ICredentialMapper, connector: IUpstreamConnector,
                 client: ClientInfo, net: SafetyNet | None = None, always: bool = False,
                 limits: RateLimits | None = None) -> None:
        self._mapper, self._connector, self._client = mapper, connector, client
        self._net, self._always, self._limits = net, always, limits
        self._quota: Quota | None = None  # what the rate limits reserved for it
        self._route: str | None = None
        self.outcome: MessageOutcome | None = None
        self._session: IUpstreamSession | None = None
        self._account: UpstreamAccount | None = None
        self._sender = ""
        self._params: Params = {}
        self._filter = BodyFilter()
        self._can_spool = False  # the message may go to the spool if need be
        self._spooling = False  # it does: the upstream is out of this transaction
        self._accepted: list[str] = []  # recipients the upstream took
        self._deferred: list[str] = []  # recipients for the spool
        self._writer: SpoolWriter | None = None
        self._why: Reply | None = None  # why the message went to the spool
        self._data_sent = False  # DATA went upstream: only an abort may end the session now
        self._refusal: SMTPReplyError | None = None  # the body was refused on its way
        self._lost: UpstreamError | None = None  # how the upstream session failed
        self._in_data = self._over = False
        self._early: EarlyBody | None = None  # the body, until the upstream's 354
        self._settled: Deferred[None] | None = None  # fires once that answer is taken
        self._data_refusal: SMTPReplyError | None = None  # the upstream refused DATA

    # MAIL.

    def mail(self, sender: str, params: Params) -> Deferred[Reply]:
        def answered(result: Reply | Failure) -> Reply | Failure:
            if isinstance(result, Failure) or not result.positive:
                self._verdict(result, upstream=self._session is not None)
            return result

        return Deferred.fromCoroutine(self._mail(sender, params)).addBoth(answered)

    async def _mail(self, sender: str, params: Params) -> Reply:
        mapped = self._mapper.map(self._client, sender)
        assignment = await mapped if isinstance(mapped, Deferred) else mapped
        account = self._account = assignment.account
        self._route = assignment.routes[0].name
        if self._limits is not None:
            self._quota = self._limits.quota(self._client,
                                             account.name if account is not None else None)
            refusal = self._quota.message()
            if refusal is not None:
                raise SMTPReplyError(refusal)
        rewrite_to = account.rewrite_sender if account is not None else None
        if rewrite_to and sender:  # providers refuse a sender that is not the login's own
            sender = rewrite_to
        self._sender, self._params = sender, dict(params)
        self._filter = BodyFilter(rewrite_to)
        net = self._net if self._net is not None and self._net.accepts(account) else None
        self._can_spool = net is not None and not net.full()
        if self._always and self._can_spool:
            self._spooling = True
            return SENDER_OK
        try:
            session = await connect_first(self._connector, assignment.routes, account,
                                          session=self._client.session_id)
        except SMTPReplyError as e:
            if self._over:
                raise SMTPReplyError(GONE)
            if e.reply.transient and self._can_spool:
                return self._to_spool(e.reply)
            if e.reply.transient and net is not None:
                return SPOOL_FULL
            raise
        if self._over:  # the client left while we were connecting
            session.quit()
            raise SMTPReplyError(GONE)
        self._session = session
        if "SMTPUTF8" in params and "SMTPUTF8" not in session.features:
            # Relayed without it only while nothing needs it: ASCII addresses and headers.
            if not sender.isascii():
                return UPSTREAM_NO_SMTPUTF8
            self._filter.ascii_headers = True
        try:
            reply = await session.mail(sender, params)
        except UpstreamError as e:
            if self._can_spool:
                return self._to_spool(e.reply)
            raise
        if reply.transient and self._can_spool:
            return self._to_spool(reply)
        return reply

    def _to_spool(self, why: Reply) -> Reply:
        """The upstream is out of this transaction: what it took so far goes to the spool
        (the summary line says C{why})."""
        self._why = why
        self._spooling = True
        self._deferred = self._accepted + self._deferred
        self._accepted = []
        session, self._session = self._session, None
        if session is not None:
            session.abort() if self._data_sent else session.quit()
        return SENDER_OK

    def _current(self) -> IUpstreamSession:
        if self._session is None or self._over:
            raise SMTPReplyError(GONE)
        return self._session

    # RCPT.

    def rcpt(self, recipient: str, params: Params) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._rcpt(recipient, params))

    async def _rcpt(self, recipient: str, params: Params) -> Reply:
        if self._filter.ascii_headers and not recipient.isascii():
            return UPSTREAM_NO_SMTPUTF8
        quota = self._quota
        refusal = quota.recipient() if quota is not None else None
        if refusal is not None:
            return refusal
        reply = await self._relay_rcpt(recipient, params)
        if quota is not None and not reply.positive:
            quota.recipient_refused()
        return reply

    async def _relay_rcpt(self, recipient: str, params: Params) -> Reply:
        if self._spooling:
            self._deferred.append(recipient)
            return RECIPIENT_OK
        try:
            reply = await self._current().rcpt(recipient, params)
        except UpstreamError as e:
            if not self._can_spool:
                self._lost = e
                raise
            self._to_spool(e.reply)
            self._deferred.append(recipient)
            return RECIPIENT_OK
        if reply.positive:
            self._accepted.append(recipient)
        elif reply.transient and self._can_spool:
            log.info("{session} upstream deferred <{recipient}> ({code} {text}); it goes to "
                     "the spool", session=self._client.session_id, recipient=recipient,
                     code=reply.code, text=reply.text)
            self._deferred.append(recipient)
            return RECIPIENT_OK
        return reply

    # DATA and the body.

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        def answered(result: Reply | Failure) -> Reply | Failure:
            if isinstance(result, Failure) or result.code != 354:
                self._verdict(result, upstream=isinstance(result, Reply))
            return result

        return Deferred.fromCoroutine(self._data(producer)).addBoth(answered)

    async def _data(self, producer: IPushProducer) -> Reply:
        if self._can_spool and self._net is not None:
            self._writer = self._net.writer()
        if not self._spooling and not self._accepted and self._deferred:
            self._to_spool(Reply(450, None, "every recipient was deferred"))
        if self._spooling:
            self._in_data = True
            return START_DATA
        session = self._current()
        self._data_sent = True
        early = EarlyBody(session, producer)
        answer = session.data(early.producer)
        if not answer.called:  # the client starts on the body while the upstream answers
            self._early, self._settled = early, Deferred()
            answer.addBoth(self._early_answer)
            self._in_data = True
            return START_DATA
        try:
            reply = self._data_answer(await answer)
        except UpstreamError as e:
            reply = self._data_answer(e)
        if reply.code == 354 and not self._over:
            self._in_data = True
        return reply

    def _data_answer(self, answer: Reply | UpstreamError) -> Reply:
        """What the client hears for the upstream's answer to DATA; raises when the
        upstream session is lost and the spool cannot keep the message."""
        if isinstance(answer, UpstreamError):
            if self._writer is None:
                self._lost = answer
                raise answer
            self._to_spool(answer.reply)
            return START_DATA
        if answer.code == 354:
            return answer
        self._data_sent = False
        if answer.transient and self._writer is not None:
            self._to_spool(answer)
            return START_DATA
        self._discard()
        return answer

    def _early_answer(self, result: Reply | Failure) -> None:
        """The upstream's answer to DATA (the client had the bridge's 354), taken before
        the client goes on: it may then send its dot at once."""
        early, self._early, settled = self._early, None, self._settled
        try:
            if early is not None:  # (None: the transaction was aborted meanwhile)
                self._take_answer(early, result)
        finally:
            if settled is not None and not settled.called:
                settled.callback(None)

    def _take_answer(self, early: EarlyBody, result: Reply | Failure) -> None:
        if isinstance(result, Failure) and not isinstance(result.value, UpstreamError):
            log.failure("{session} DATA failed", result, session=self._client.session_id)
        answer = (result if isinstance(result, Reply) else result.value
                  if isinstance(result.value, UpstreamError) else UpstreamError(GONE))
        refusal: SMTPReplyError | None = None  # (when the session is lost)
        try:
            reply = self._data_answer(answer)
        except UpstreamError as e:
            reply, refusal = e.reply, e
        if reply.code == 354 and self._session is not None:
            early.send()
            return
        if reply.code != 354:  # refused: the final dot gets the refusal
            self._data_refusal = refusal or SMTPReplyError(reply)
            session, self._session = self._session, None
            if session is not None:
                session.quit()
        early.drop()

    def write(self, lines: Sequence[bytes]) -> None:
        if not self._in_data or self._over:
            return
        try:
            lines = self._filter.feed(lines)
        except SMTPReplyError as e:  # fail closed: nothing of this message goes anywhere
            self._refusal = e
            self.abort()
            return
        self._emit(lines)

    def _emit(self, lines: Sequence[bytes]) -> None:
        """Lines ready to go: into the spool file and upstream."""
        if self._writer is not None:
            self._writer.write(lines)
        if self._early is not None:
            self._early.write(lines)
        elif self._session is not None and lines:
            self._session.write_lines(lines)

    # The final dot.

    def finish(self) -> Deferred[Reply]:
        if self._refusal is not None:
            self._note(self._refusal.reply, upstream=False)
            return fail(self._refusal)
        if self._over or not self._in_data:
            error = self._lost or SMTPReplyError(GONE)
            self._note(error.reply, upstream=False)
            return fail(error)
        self._emit(self._filter.close())
        self._in_data = False
        self._over = True
        def failed(failure: Failure) -> Failure:
            self._verdict(failure, upstream=False)
            return failure

        return Deferred.fromCoroutine(self._finish()).addErrback(failed)

    async def _finish(self) -> Reply:
        if self._early is not None and self._settled is not None:
            await self._settled  # the upstream's answer to DATA
        if self._data_refusal is not None:
            raise self._data_refusal
        if self._spooling:
            return await self._keep(self._deferred)
        session = self._session
        if session is None:  # aborted meanwhile
            raise self._lost or SMTPReplyError(GONE)
        try:
            reply = await session.end_data()
        except UpstreamError as e:
            if self._writer is None:
                raise
            self._why = e.reply  # lost at the final dot
            return await self._keep(self._accepted + self._deferred)
        finally:
            session.quit()
        if reply.transient and self._writer is not None:
            self._why = reply
            return await self._keep(self._accepted + self._deferred)
        if reply.positive and self._deferred:
            queued = await self._keep(self._deferred, delivered=True)
            if not queued.positive:
                return queued  # the deferred ones could not be kept: the client retries
            self._note(reply, upstream=True)
            return Reply(reply.code, reply.enhanced,
                         f"{reply.text}; {len(self._deferred)} recipient(s) {queued.text[4:]}")
        self._discard()
        self._note(reply, upstream=True)
        return reply

    def abort(self) -> None:
        if self._quota is not None:
            self._quota.settle(sent=False)  # (a message sent is settled already)
        if self._over and self._writer is None and self._session is None:
            return
        self._over = True
        self._discard()
        early, self._early = self._early, None
        if early is not None:
            early.drop()
        session, self._session = self._session, None
        if session is None:
            return
        if self._data_sent:
            session.abort()  # no final dot: the upstream drops what it got
        else:
            session.quit()


@implementer(IDelivery)
class InlineDelivery:
    """Relays every transaction upstream as it happens; with a safety net (the spool),
    keeps what the upstream cannot take now, or (C{always}) spools everything."""

    def __init__(self, mapper: ICredentialMapper, connector: IUpstreamConnector,
                 net: SafetyNet | None = None, always: bool = False,
                 limits: RateLimits | None = None) -> None:
        self._mapper = mapper
        self._connector = connector
        self._net = net
        self._always = always
        self._limits = limits

    def transaction(self, client: ClientInfo) -> InlineTransaction:
        return InlineTransaction(self._mapper, self._connector, client, self._net,
                                 self._always, self._limits)
