"""In-line delivery: each transaction is carried out upstream while the client waits.

The client hears the upstream's own replies to MAIL, RCPT, DATA and the final
dot, so the bridge never says 250 to a message the upstream has not taken.
The body streams through with back-pressure.  A transaction abandoned in the
middle of DATA drops the upstream connection without the final dot, so nothing
half-sent can be delivered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.client import where
from smtpbridge.errors import LoginRejected, SMTPReplyError
from smtpbridge.interfaces import (
    ICredentialMapper,
    IDelivery,
    IReportingTransaction,
    IUpstreamConnector,
    IUpstreamSession,
    Params,
)
from smtpbridge.model import (
    ClientInfo,
    MessageOutcome,
    Reply,
    Route,
    UpstreamAccount,
    status_for,
)
from smtpbridge.ratelimit import Quota, RateLimits
from smtpbridge.replies import UPSTREAM_NO_SMTPUTF8
from smtpbridge.rewrite import HeaderTooLarge, SenderRewriter
from smtpbridge.summary import queue_id

log = Logger()

GONE = Reply(451, "4.3.0", "Upstream session is no longer available")


async def connect_first(connector: IUpstreamConnector, routes: tuple[Route, ...],
                        account: UpstreamAccount | None,
                        stop_on_rejection: bool = False, session: str = "-",
                        ) -> IUpstreamSession:
    """A session on the first route that connects, verifies and accepts the login.

    Only setup failures move on to the next host, and they all happen before
    MAIL FROM, so failing over can never send a message twice.  When every host
    fails, a refused login (a verdict on the credentials) wins over the others;
    C{stop_on_rejection} makes it final at once.  C{session} is the downstream session
    id the log lines name.
    """
    error: SMTPReplyError | None = None
    refused: LoginRejected | None = None
    for index, route in enumerate(routes):
        try:
            return await connector.connect(route, account)
        except SMTPReplyError as e:
            error = e
            if isinstance(e, LoginRejected) and refused is None:
                refused = e
                if stop_on_rejection:
                    break
            if index + 1 < len(routes):
                log.warn("{session} upstream {host}:{port} failed ({text}); trying {next}",
                         session=session, host=route.host, port=route.port,
                         text=e.reply.text, next=routes[index + 1].host)
    assert error is not None, "a route list is never empty"
    raise refused or error


def try_login(connector: IUpstreamConnector,
              ) -> Callable[[tuple[Route, ...], UpstreamAccount], Deferred[bool]]:
    """A check that logs in upstream with an account: True, False if the login was
    refused, an error if the upstream could not be asked.  A refusal is not tried on the
    other hosts: a wrong password should not count against the account everywhere."""
    async def check(routes: tuple[Route, ...], account: UpstreamAccount) -> bool:
        try:
            session = await connect_first(connector, routes, account, stop_on_rejection=True)
        except LoginRejected:
            return False
        await session.quit()
        return True

    return lambda routes, account: Deferred.fromCoroutine(check(routes, account))


@implementer(IReportingTransaction)
class InlineTransaction:
    """One transaction relayed to one upstream session; its C{outcome} says how the
    message ended: sent, refused or deferred, by which account, route and upstream."""

    def __init__(self, mapper: ICredentialMapper, connector: IUpstreamConnector,
                 client: ClientInfo, limits: RateLimits | None = None) -> None:
        self._mapper = mapper
        self._limits = limits
        self._quota: Quota | None = None  # what the rate limits reserved for it
        self._connector = connector
        self._client = client
        self._session: IUpstreamSession | None = None
        self._rewriter: SenderRewriter | None = None
        self._data_sent = False  # DATA went upstream: only an abort may end the session now
        self._refusal: SMTPReplyError | None = None  # the body was refused on its way
        self._ascii_only = False  # SMTPUTF8 asked for, the upstream lacks it
        self._in_header = True
        self._in_data = False
        self._over = False
        self._account: str | None = None  # names, for the outcome
        self._route: str | None = None
        self.outcome: MessageOutcome | None = None

    def _note(self, reply: Reply, upstream: bool) -> None:
        """Note the outcome of a step that ended the message (or its transaction);
        C{upstream}: the reply is the upstream's own."""
        session = self._session
        relay = where(session.route) if session is not None and upstream else None
        self.outcome = MessageOutcome(status_for(reply), self._account, self._route, relay,
                                      reply, queue_id(reply) if reply.positive else None)
        if self._quota is not None:
            self._quota.settle(sent=reply.positive)

    def _verdict(self, result: Reply | Failure) -> Reply | Failure:
        if isinstance(result, Reply):
            self._note(result, upstream=True)
        elif isinstance(result.value, SMTPReplyError):
            self._note(result.value.reply, upstream=False)
        return result

    def mail(self, sender: str, params: Params) -> Deferred[Reply]:
        def answered(result: Reply | Failure) -> Reply | Failure:
            if isinstance(result, Failure) or not result.positive:
                self._verdict(result)
            return result

        return Deferred.fromCoroutine(self._mail(sender, params)).addBoth(answered)

    async def _mail(self, sender: str, params: Params) -> Reply:
        mapped = self._mapper.map(self._client, sender)
        assignment = await mapped if isinstance(mapped, Deferred) else mapped
        account = assignment.account
        self._account = account.name if account is not None else None
        self._route = assignment.routes[0].name
        if self._limits is not None:
            self._quota = self._limits.quota(self._client, self._account)
            refusal = self._quota.message()
            if refusal is not None:
                raise SMTPReplyError(refusal)
        session = await connect_first(self._connector, assignment.routes, account,
                                      session=self._client.session_id)
        if self._over:  # the client left while we were connecting
            session.quit()
            raise SMTPReplyError(GONE)
        self._session = session
        if "SMTPUTF8" in params and "SMTPUTF8" not in session.features:
            # Relayed without it only while nothing needs it: ASCII addresses and headers.
            if not sender.isascii():
                return UPSTREAM_NO_SMTPUTF8
            self._ascii_only = True
        if account is not None and account.rewrite_sender:
            # Providers refuse mail whose sender is not the login's own address.
            self._rewriter = SenderRewriter(account.rewrite_sender)
            if sender:
                sender = account.rewrite_sender
        return await session.mail(sender, params)

    def _current(self) -> IUpstreamSession:
        if self._session is None or self._over:
            raise SMTPReplyError(GONE)
        return self._session

    def rcpt(self, recipient: str, params: Params) -> Deferred[Reply]:
        if self._ascii_only and not recipient.isascii():
            return succeed(UPSTREAM_NO_SMTPUTF8)
        quota = self._quota
        refusal = quota.recipient() if quota is not None else None
        if refusal is not None:
            return succeed(refusal)

        def answered(reply: Reply) -> Reply:
            if quota is not None and not reply.positive:
                quota.recipient_refused()
            return reply

        return maybeDeferred(lambda: self._current().rcpt(recipient, params)).addCallback(
            answered)

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        def answered(reply: Reply) -> Reply:
            if reply.code == 354 and not self._over:
                self._in_data = True
            elif reply.code != 354:
                self._data_sent = False  # refused: the session can still quit politely
                self._verdict(reply)
            return reply

        self._data_sent = True
        return maybeDeferred(lambda: self._current().data(producer)).addCallback(answered)

    def write(self, lines: Sequence[bytes]) -> None:
        session = self._session
        if self._in_data and not self._over and session is not None:
            if self._ascii_only and self._in_header:
                self._check_ascii_header(lines)
                if self._over:
                    return
            if self._rewriter is not None:
                try:
                    lines = self._rewriter.feed(list(lines))
                except HeaderTooLarge as e:
                    # Fail closed: never relay the message with its own From:.
                    self._refusal = e
                    self.abort()
                    return
            if lines:
                session.write_lines(lines)

    def _check_ascii_header(self, lines: Sequence[bytes]) -> None:
        """Without SMTPUTF8 upstream, a non-ASCII header line refuses the message."""
        for line in lines:
            if not line:
                self._in_header = False
                return
            if not line.isascii():
                self._refusal = SMTPReplyError(UPSTREAM_NO_SMTPUTF8)
                self.abort()
                return

    def finish(self) -> Deferred[Reply]:
        if self._refusal is not None:
            self._note(self._refusal.reply, upstream=False)
            return fail(self._refusal)
        try:
            session = self._current()
        except SMTPReplyError as e:
            self._note(e.reply, upstream=False)
            return fail(e)
        if self._rewriter is not None and self._in_data:
            rest = self._rewriter.close()
            if rest:
                session.write_lines(rest)
        self._over = True
        self._in_data = False

        def done(result: Reply | Failure) -> Reply | Failure:
            session.quit()
            return result

        return session.end_data().addBoth(self._verdict).addBoth(done)

    def abort(self) -> None:
        if self._quota is not None:
            self._quota.settle(sent=False)  # (a message sent is settled already)
        if self._over:
            return
        self._over = True
        session, self._session = self._session, None
        if session is None:
            return
        if self._data_sent:
            session.abort()  # no final dot: the upstream drops what it got
        else:
            session.quit()


@implementer(IDelivery)
class InlineDelivery:
    """Relays every transaction upstream as it happens."""

    def __init__(self, mapper: ICredentialMapper, connector: IUpstreamConnector,
                 limits: RateLimits | None = None) -> None:
        self._mapper = mapper
        self._connector = connector
        self._limits = limits

    def transaction(self, client: ClientInfo) -> InlineTransaction:
        return InlineTransaction(self._mapper, self._connector, client, self._limits)
