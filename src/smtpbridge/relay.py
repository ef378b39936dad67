"""In-line delivery: each transaction is carried out upstream while the client waits.

The client hears the upstream's own replies to MAIL, RCPT, DATA and the final
dot, so the bridge never says 250 to a message the upstream has not taken.
The body streams through with back-pressure.  A transaction abandoned in the
middle of DATA drops the upstream connection without the final dot, so nothing
half-sent can be delivered.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import ICredentialMapper, IDelivery, ITransaction
from smtpbridge.model import Assignment, ClientInfo, Reply, Route, UpstreamAccount

log = Logger()

Connector = Callable[[Route, UpstreamAccount | None], Deferred]
GONE = Reply(451, "4.3.0", "Upstream session is no longer available")


@implementer(ITransaction)
class InlineTransaction:
    """One transaction relayed to one upstream session."""

    def __init__(self, mapper: ICredentialMapper, connect: Connector, client: ClientInfo) -> None:
        self._mapper = mapper
        self._connect = connect
        self._client = client
        self._session: object | None = None
        self._in_data = False
        self._over = False

    def mail(self, sender: str, params: dict) -> Deferred:
        def connect(assignment: Assignment) -> Deferred:
            return self._connect(assignment.route, assignment.account)

        def connected(session: object) -> Deferred:
            if self._over:  # the client left while we were connecting
                session.quit()
                raise SMTPReplyError(GONE)
            self._session = session
            return session.mail(sender, params)

        d = maybeDeferred(self._mapper.map, self._client, sender)
        return d.addCallback(connect).addCallback(connected)

    def _current(self) -> object:
        if self._session is None or self._over:
            raise SMTPReplyError(GONE)
        return self._session

    def rcpt(self, recipient: str, params: dict) -> Deferred:
        return maybeDeferred(lambda: self._current().rcpt(recipient, params))

    def data(self, producer: IPushProducer) -> Deferred:
        def answered(reply: Reply) -> Reply:
            if reply.code == 354 and not self._over:
                self._in_data = True
                self._session.register_producer(producer)
            return reply

        return maybeDeferred(lambda: self._current().data()).addCallback(answered)

    def write(self, lines: list[bytes]) -> None:
        if self._in_data and not self._over:
            self._session.write_lines(lines)

    def finish(self) -> Deferred:
        try:
            session = self._current()
        except SMTPReplyError as e:
            return fail(e)
        self._over = True
        self._in_data = False
        session.unregister_producer()

        def done(result: object) -> object:
            session.quit()
            return result

        return session.end_data().addBoth(done)

    def abort(self) -> None:
        if self._over:
            return
        self._over = True
        session, self._session = self._session, None
        if session is None:
            return
        if self._in_data:
            session.unregister_producer()
            session.abort()  # no final dot: the upstream drops what it got
        else:
            session.quit()


@implementer(IDelivery)
class InlineDelivery:
    """Relays every transaction upstream as it happens."""

    def __init__(self, mapper: ICredentialMapper, connect: Connector) -> None:
        self._mapper = mapper
        self._connect = connect

    def transaction(self, client: ClientInfo) -> InlineTransaction:
        return InlineTransaction(self._mapper, self._connect, client)
