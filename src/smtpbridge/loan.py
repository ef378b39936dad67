"""A kept upstream session on loan to one transaction: L{PooledSession}, what
L{smtpbridge.pool.SessionPool} hands out.

Its C{quit()} hands the session back to the pool instead of closing it.  A session that
served a transaction before is reset before MAIL FROM: its RSET went out when it was
handed back, or, to an upstream that offers PIPELINING, goes out now together with MAIL
FROM (one round trip less).  If the session turns out dead (RSET or MAIL FROM get no
answer, or a 421), a new session takes the transaction, before MAIL FROM was accepted
and so never twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from smtpbridge.client import upstream_error, where
from smtpbridge.errors import UpstreamError
from smtpbridge.interfaces import IUpstreamSession, Params
from smtpbridge.model import Reply, Route, UpstreamAccount
from smtpbridge.replies import UpstreamFailure
from smtpbridge.wire import reply_line

log = Logger()

#: Which sessions may serve a transaction: the same route (host) and the same account.
Key = tuple[Route, UpstreamAccount | None]


class Reset:
    """The RSET a session was handed back with, until its reply: the next transaction
    may take the session at once, and waits for the reply before MAIL FROM."""

    def __init__(self, sent: Deferred[Reply]) -> None:
        self.ok: bool | None = None  # None: no reply yet
        self._waiting: list[Deferred[bool]] = []
        sent.addCallbacks(lambda reply: self._done(reply.code == 250),
                          lambda failure: self._done(False))

    def _done(self, ok: bool) -> None:
        self.ok = ok
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(ok)

    def wait(self) -> Deferred[bool]:
        """Fires with True when the upstream answered 250, False otherwise."""
        if self.ok is not None:
            return succeed(self.ok)
        waiter: Deferred[bool] = Deferred()
        self._waiting.append(waiter)
        return waiter


@attr.define(eq=False)
class Found:
    """A session for a transaction."""

    session: IUpstreamSession
    messages: int = 0  # messages it has carried
    kept: bool = False  # it served a transaction before
    reset: Reset | None = None  # the RSET it was handed back with
    dirty: bool = False  # it needs an RSET, to be sent with the next MAIL FROM
    since: float = 0.0  # when it was handed back
    timer: IDelayedCall | None = None  # closes it when it has been idle too long


class _Dead(Exception):
    """A kept session turned out dead; the message says how."""


class Lender(Protocol):
    """The pool, as a loan sees it."""

    def hand_back(self, key: Key, found: Found, dirty: bool) -> None:
        """The transaction is done with the session (C{dirty}: a command was sent)."""

    def replacement(self, key: Key) -> Deferred[Found]:
        """A new session for a transaction whose kept session turned out dead."""


@implementer(IUpstreamSession)
class PooledSession:
    """An upstream session on loan from the pool to one transaction.  Its C{quit()} hands
    the session back; after it (or L{abort}) every call fails as on a closed session."""

    def __init__(self, pool: Lender, key: Key, found: Found) -> None:
        self._pool = pool
        self._key = key
        self._found = found
        self.route = key[0]
        self._sent = False  # a command went out: the session needs RSET to be kept
        self._ended: UpstreamError | None = None

    @property
    def _session(self) -> IUpstreamSession:
        return self._found.session

    @property
    def reused(self) -> bool:
        """The session served a transaction before this one."""
        return self._found.kept

    @property
    def messages(self) -> int:
        """The messages the session carried, this loan's included."""
        return self._found.messages

    @property
    def features(self) -> dict[str, str]:
        features: dict[str, str] = self._session.features
        return features

    @property
    def valid_until(self) -> float | None:
        valid_until: float | None = self._session.valid_until
        return valid_until

    @property
    def usable(self) -> bool:
        return self._ended is None and bool(self._session.usable)

    def mail(self, sender: str, params: Params) -> Deferred[Reply]:
        if self._ended is not None:
            return fail(self._ended)
        first, self._sent = not self._sent, True
        if first and self._found.kept:
            return Deferred.fromCoroutine(self._first_mail(sender, params))
        return self._session.mail(sender, params)

    async def _first_mail(self, sender: str, params: Params) -> Reply:
        """MAIL FROM on a kept session, after its RSET.  If the session turns out dead
        (RSET or MAIL FROM get no answer, or a 421: it is closing), nothing was accepted,
        and a new session takes the transaction."""
        old, found = self._session, self._found
        try:
            if found.reset is not None and not await found.reset.wait():
                raise _Dead("RSET failed")
            reset = self._pipelined_reset()
            mail = old.mail(sender, params)
            try:
                if reset is not None:
                    answer: Reply = await reset
                    if answer.code != 250:
                        raise _Dead(f"RSET: {reply_line(answer)}")
            except BaseException:
                mail.addErrback(lambda failure: None)  # given up with the session
                raise
            reply: Reply = await mail
            if reply.code == 421:
                raise _Dead(reply_line(reply))
            return reply
        except UpstreamError as e:
            why = e.reply.text
        except _Dead as e:
            why = str(e)
        old.abort()
        if self._ended is not None:
            raise self._ended
        log.info("upstream {where}: a kept session is gone ({why}); a new one takes over",
                 where=where(self.route), why=why)
        found = await self._pool.replacement(self._key)
        if self._ended is not None:  # the client left meanwhile
            self._pool.hand_back(self._key, found, dirty=False)
            raise self._ended
        self._found = found
        fresh: Reply = await found.session.mail(sender, params)
        return fresh

    def rcpt(self, recipient: str, params: Params) -> Deferred[Reply]:
        return self._call(lambda: self._session.rcpt(recipient, params))

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        return self._call(lambda: self._session.data(producer))

    def write_lines(self, lines: Sequence[bytes]) -> None:
        if self._ended is None:
            self._session.write_lines(lines)

    def end_data(self) -> Deferred[Reply]:
        if self._ended is None:
            self._found.messages += 1
        return self._call(self._session.end_data)

    def reset(self) -> Deferred[Reply]:
        return self._call(self._session.reset)

    def _call(self, call: Callable[[], Deferred[Reply]]) -> Deferred[Reply]:
        if self._ended is not None:
            return fail(self._ended)
        self._sent = True
        reset = self._pipelined_reset()
        if reset is not None:  # not MAIL FROM first: the RSET goes first all the same
            reset.addErrback(lambda failure: None)  # the command after it fails alike
        return call()

    def _pipelined_reset(self) -> Deferred[Reply] | None:
        """The RSET the session still owes, sent now (ahead of the next command)."""
        if not self._found.dirty:
            return None
        self._found.dirty = False
        reset: Deferred[Reply] = self._session.reset()
        return reset

    def quit(self) -> Deferred[None]:
        """Hand the session back to the pool; never fails."""
        if self._ended is None:
            self._ended = upstream_error(self.route, UpstreamFailure.LOST, "session was closed")
            self._pool.hand_back(self._key, self._found, self._sent)
        return succeed(None)

    def abort(self) -> None:
        """Drop the connection at once (a message in DATA is never finished upstream); the
        session is not kept."""
        if self._ended is None:
            self._ended = upstream_error(self.route, UpstreamFailure.LOST,
                                         "session was aborted")
            self._session.abort()
