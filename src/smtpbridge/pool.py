"""Logged-in upstream sessions kept for the next message: L{SessionPool}, the
L{IUpstreamConnector} the bridge relays through.

Delivery does not change: it connects, drives the session and calls C{quit()}.  The
pool's sessions (L{PooledSession}) answer C{quit()} by resetting the upstream session
(RSET) and keeping it, so the next transaction skips the connection, the TLS handshake
and the login.  What the pool holds to:

- a session serves only the route and account it logged in with (a passthrough login,
  name and password, is an account of its own);
- a kept session is closed after the route's C{session_idle} seconds unused, after
  C{max_messages} messages, before its OAuth2 token expires, on SIGHUP (L{drain}) and
  when the bridge stops;
- kept sessions hold their host's slot (C{max_sessions}); a transaction that waits for
  a slot gets the next session its account hands back, and one of another account
  makes room by closing an idle session;
- a kept session that turns out dead (RSET fails, MAIL FROM gets no answer or a 421)
  is replaced by a new one before MAIL FROM is accepted, never after, so a message is
  neither lost nor sent twice.

The pool lives in one process: each worker has its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attr
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.connector import SessionSlots
from smtpbridge.interfaces import IUpstreamConnector, IUpstreamSession
from smtpbridge.loan import Found, Key, PooledSession, Reset
from smtpbridge.model import Route, UpstreamAccount

#: Seconds before its OAuth2 token expires that a session is no longer used.
TOKEN_MARGIN = 60.0


class SlotConnector(Protocol):
    """What the pool needs of the connector beneath it (L{UpstreamConnector}, or the
    fake upstream of the tests): the hosts' session slots, and sessions opened in a slot
    the caller holds."""

    slots: SessionSlots

    def open(self, route: Route, account: UpstreamAccount | None,
             release: Callable[[], None]) -> Deferred[IUpstreamSession]: ...


def _host(route: Route) -> tuple[str, int]:
    return route.host, route.port


@attr.define(eq=False)
class _Waiter:
    """A transaction waiting for a slot of its host, or (C{handover}) for a session of its
    account handed back meanwhile."""

    key: Key
    result: Deferred[Found]
    slot: Deferred[Any]  # the slot being waited for
    handover: bool  # a session of its account handed back will do
    handed: bool = False  # it got a session handed back instead of the slot


@implementer(IUpstreamConnector)
class SessionPool:
    """Keeps logged-in sessions of C{connector} per route and account (see the module)."""

    def __init__(self, connector: SlotConnector, clock: IReactorTime) -> None:
        self._connector = connector
        self._slots = connector.slots
        self._clock = clock
        self._idle: dict[Key, list[Found]] = {}  # oldest first; the newest is used first
        self._waiters: dict[tuple[str, int], list[_Waiter]] = {}  # oldest first
        self._stopped = False
        self.opened = 0  # sessions opened
        self.reused = 0  # transactions served by a session that served one before

    @property
    def fresh(self) -> IUpstreamConnector:
        """This pool, except that every session is a new login (a passthrough AUTH check:
        the password is tried on the upstream itself); it is kept like any other."""
        return _FreshLogins(self)

    def idle(self) -> int:
        """The sessions kept idle now."""
        return sum(len(kept) for kept in self._idle.values())

    def connect(self, route: Route, account: UpstreamAccount | None,
                ) -> Deferred[IUpstreamSession]:
        return self._connect(route, account, reuse=True)

    def _connect(self, route: Route, account: UpstreamAccount | None,
                 reuse: bool) -> Deferred[IUpstreamSession]:
        if route.session_idle <= 0:  # the route keeps nothing
            plain: Deferred[Any] = self._slots.acquire(route).addCallback(
                lambda release: self._connector.open(route, account, release))
            return plain
        key = (route, account)
        if reuse:
            kept = self._take(key)
            if kept is not None:
                self.reused += 1
                return succeed(PooledSession(self, key, kept))
        opened: Deferred[Any] = self._new(key, handover=reuse).addCallback(
            lambda found: PooledSession(self, key, found))
        return opened

    # Taking sessions.

    def _fit(self, found: Found) -> bool:
        """Still fit for another transaction: under the message limit, its token good for
        a while, and connected and idle (or with its RSET not answered yet)."""
        session = found.session
        if found.messages >= session.route.max_messages or (found.reset and
                                                             found.reset.ok is False):
            return False
        if (found.reset is None or found.reset.ok) and not session.usable:
            return False
        return session.valid_until is None or \
            self._clock.seconds() < session.valid_until - TOKEN_MARGIN

    def _take(self, key: Key) -> Found | None:
        """The newest kept session of C{key} still fit to use; the unfit are closed."""
        kept = self._idle.get(key)
        while kept:
            candidate = kept.pop()
            _stop_timer(candidate)
            if self._fit(candidate):
                return candidate
            candidate.session.quit()
        self._idle.pop(key, None)
        return None

    def _new(self, key: Key, handover: bool) -> Deferred[Found]:
        """A new session once a slot is free; with C{handover}, the first session of the
        same account handed back meanwhile instead."""
        route, account = key
        if not self._slots.free(route):
            self._make_room(route)
        slot = self._slots.acquire(route)
        result: Deferred[Found] = Deferred()
        waiter = _Waiter(key, result, slot, handover)
        if not slot.called:
            self._waiters.setdefault(_host(route), []).append(waiter)

        def got(release: Callable[[], None]) -> None:
            self._unwait(waiter)
            self.opened += 1
            self._connector.open(route, account, release).addCallback(Found).chainDeferred(
                result)

        def not_got(failure: Failure) -> None:
            self._unwait(waiter)
            if not waiter.handed:
                result.errback(failure)

        slot.addCallbacks(got, not_got)
        return result

    def _unwait(self, waiter: _Waiter) -> None:
        host = _host(waiter.key[0])
        waiters = self._waiters.get(host)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[host]

    def _make_room(self, route: Route) -> None:
        """Every slot of the host is taken: close its longest idle session, whose slot
        then goes to the transaction that waits longest."""
        host = _host(route)
        oldest: tuple[Key, Found] | None = None
        dead: list[tuple[Key, Found]] = []  # gone already: closing them frees no slot
        for key, kept in self._idle.items():
            if _host(key[0]) != host:
                continue
            for found in kept:
                if (found.reset is None or found.reset.ok) and not found.session.usable:
                    dead.append((key, found))
                elif oldest is None or found.since < oldest[1].since:
                    oldest = key, found
        for key, found in dead:
            self._drop(key, found)
        if oldest is not None:
            self._drop(*oldest)

    # Handing sessions back.

    def hand_back(self, key: Key, found: Found, dirty: bool) -> None:
        """A transaction is done with the session: reset it (when C{dirty}: a command was
        sent) and keep it, or close it."""
        if dirty:
            found.reset = None  # what counts now is the session after the transaction
        if dirty and not self._stopped and self._fit(found):
            if "PIPELINING" in found.session.features:
                found.dirty = True  # the RSET goes out with the next MAIL FROM
            else:
                found.reset = Reset(found.session.reset())
        if self._stopped or not self._fit(found):  # its RSET may have failed at once
            found.session.quit()  # aborted instead when in DATA
            return
        self._keep(key, found)
        if found.reset is not None and found.reset.ok is None:
            def answered(ok: bool) -> None:
                if not ok:
                    self._drop(key, found)  # when idle; a taker replaces it itself

            found.reset.wait().addCallback(answered)

    def _keep(self, key: Key, found: Found) -> None:
        route = key[0]
        found.kept = True
        waiters = self._waiters.get(_host(route))
        if waiters:
            first = waiters[0]
            if first.key != key or not first.handover:
                # Its slot goes to the transaction that waits longest (one of another
                # account, or one that needs a new login).
                found.session.quit()
                return
            self._unwait(first)
            first.handed = True
            first.slot.cancel()
            self.reused += 1
            first.result.callback(found)
            return
        now = self._clock.seconds()
        delay = route.session_idle
        if found.session.valid_until is not None:
            delay = min(delay, found.session.valid_until - TOKEN_MARGIN - now)
        found.since = now
        found.timer = self._clock.callLater(max(0.0, delay), self._drop, key, found)
        self._idle.setdefault(key, []).append(found)

    def _drop(self, key: Key, found: Found) -> None:
        """Close an idle session (it idled too long, its RSET failed, or its slot is
        needed); nothing happens to a session that was taken meanwhile."""
        kept = self._idle.get(key, [])
        if found in kept:
            kept.remove(found)
            if not kept:
                del self._idle[key]
            _stop_timer(found)
            found.session.quit()

    def replacement(self, key: Key) -> Deferred[Found]:
        """A new session for a transaction whose kept session turned out dead."""
        return self._new(key, handover=False)

    # Closing.

    def drain(self) -> Deferred[None]:
        """Close every idle session (SIGHUP: new CA bundles; stopping).  Sessions in use
        go on; they are kept afterwards unless the pool is stopped."""
        quits: list[Deferred[None]] = []
        idle, self._idle = self._idle, {}
        for kept in idle.values():
            for found in kept:
                _stop_timer(found)
                quits.append(found.session.quit())
        return gatherResults(quits).addCallback(lambda _: None)

    def stop(self) -> Deferred[None]:
        """Keep nothing from now on, and close every idle session."""
        self._stopped = True
        return self.drain()


def _stop_timer(found: Found) -> None:
    if found.timer is not None and found.timer.active():
        found.timer.cancel()
    found.timer = None


@implementer(IUpstreamConnector)
class _FreshLogins:
    """The pool's sessions, each a new login."""

    def __init__(self, pool: SessionPool) -> None:
        self._pool = pool

    def connect(self, route: Route, account: UpstreamAccount | None,
                ) -> Deferred[IUpstreamSession]:
        return self._pool._connect(route, account, reuse=False)
