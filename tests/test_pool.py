"""The pool of kept upstream sessions: in memory over L{smtpbridge.testing.FakeUpstream}
with a Clock, then against aiosmtpd through the running bridge.

What must hold: a session serves only the account it logged in with; the limits (idle
time, messages per session, sessions per host, OAuth2 token lifetime) hold; a kept
session that turns out dead is replaced before MAIL FROM is accepted and never after,
so no message is ever lost or sent twice.
"""

from __future__ import annotations

import itertools
import smtplib
import threading
import time
from collections.abc import Callable
from typing import Any

import attr
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread
from twisted.python.failure import Failure

from smtpbridge.connector import UpstreamConnector
from smtpbridge.errors import SMTPReplyError
from smtpbridge.mapping import StaticMapper
from smtpbridge.model import Assignment, ClientInfo, Reply, Route, UpstreamAccount
from smtpbridge.pool import TOKEN_MARGIN, SessionPool
from smtpbridge.relay import InlineTransaction
from smtpbridge.secret import Secret
from smtpbridge.testing import QUEUED, UPSTREAM_FEATURES, FakeUpstream, FakeUpstreamSession
from tests.conftest import (
    PASSWORD,
    USER,
    DemoUpstream,
    RunningBridge,
    client_context,
    start_bridge,
    stop_bridge,
)
from tests.test_relay import Relay, relay, relay_toml, smtps
from tests.test_upstream_contract import Producer
from tests.upstream import Upstream, upstream, upstream_factory

FIXTURES = (relay, relay_toml, upstream, upstream_factory)  # pytest finds them by name

ROUTE = Route("smtp.example.com", 587, max_sessions=3, session_wait=10.0, session_idle=30.0,
              max_messages=5)
ALICE = UpstreamAccount("alice@example.com", Secret("alice-pass"), name="alice")
BOB = UpstreamAccount("bob@example.com", Secret("bob-pass"), name="bob")
CAROL = UpstreamAccount("carol@example.com", Secret("carol-pass"), name="carol")
# Passthrough logins: the same name with another password is another account.
DAVE = UpstreamAccount("dave@example.com", Secret("right"), name="passthrough:dave")
DAVE_AGAIN = UpstreamAccount("dave@example.com", Secret("other"), name="passthrough:dave")
CLIENT = ClientInfo("192.0.2.7", 40000, "legacy", "s1", helo="printer")
RECIPIENT = "office@example.com"
LOST_MAIL = Reply(421, "4.4.2", "smtp.example.com Error: timeout exceeded")
NUMBERS = itertools.count()  # every message body is unique


@attr.define
class Bench:
    """A pool over a fake upstream, on a clock of its own."""

    clock: Clock
    upstream: FakeUpstream
    pool: SessionPool
    route: Route = ROUTE
    most_open: int = 0  # the most sessions open at once, as the upstream saw them

    def watch(self) -> None:
        self.most_open = max(self.most_open, len(self.upstream.open_sessions))


def bench(pipelining: bool = False, **route: Any) -> Bench:
    """A pool over a fake upstream; with C{pipelining}, the upstream offers PIPELINING, and
    a kept session's RSET goes out with the next MAIL FROM."""
    clock = Clock()
    features = dict(UPSTREAM_FEATURES, **({"PIPELINING": ""} if pipelining else {}))
    upstream = FakeUpstream(features, clock=clock)
    return Bench(clock, upstream, SessionPool(upstream, clock), attr.evolve(ROUTE, **route))


def outcome(deferred: Deferred[Any]) -> Any:
    """The result (or Failure) of a Deferred that has fired; the Deferred keeps it."""
    results: list[Any] = []

    def keep(result: Any) -> Any:
        results.append(result)
        return result

    deferred.addBoth(keep)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        deferred.addErrback(lambda failure: None)  # seen: not an unhandled error
    return results[0]


class Transaction:
    """One message through InlineTransaction and the pool, step by step."""

    def __init__(self, b: Bench, account: UpstreamAccount, tag: str) -> None:
        self.bench = b
        self.account = account
        self.body = f"Subject: {tag} #{next(NUMBERS)}".encode()
        self.t = InlineTransaction(StaticMapper(Assignment((b.route,), account)), b.pool,
                                   CLIENT)
        self.mail = self.t.mail(f"{account.name.split(':')[-1]}@example.com", {})
        b.watch()

    def finish(self) -> Reply:
        """RCPT, DATA, the body and the final dot; the reply to it (or the error's)."""
        result = outcome(self.mail)
        for step in (lambda: self.t.rcpt(RECIPIENT, {}), lambda: self.t.data(Producer())):
            if isinstance(result, Failure) or not result.positive:
                break
            result = outcome(step())
        if not isinstance(result, Failure) and result.code == 354:
            self.t.write([self.body])
            result = outcome(self.t.finish())
        else:
            self.t.abort()
        self.bench.watch()
        if isinstance(result, Failure):
            result.trap(SMTPReplyError)
            return result.value.reply  # type: ignore[no-any-return]
        return result  # type: ignore[no-any-return]

    def carriers(self) -> list[FakeUpstreamSession]:
        """The sessions on which the upstream accepted this message."""
        return [session for session in self.bench.upstream.sessions
                for message in session.messages if message.body == self.body + b"\r\n"]


def send(b: Bench, account: UpstreamAccount = ALICE, tag: str = "x") -> Transaction:
    t = Transaction(b, account, tag)
    assert t.finish() == QUEUED
    return t


# Sessions are kept and handed on.

TRANSACTION = ["MAIL FROM:<alice@example.com>", f"RCPT TO:<{RECIPIENT}>", "DATA", "."]


def test_a_finished_session_serves_the_next_transaction_after_rset() -> None:
    b = bench()
    send(b, tag="one")
    send(b, tag="two")
    [session] = b.upstream.sessions
    assert session.commands == TRANSACTION + ["RSET"] + TRANSACTION + ["RSET"]
    assert len(session.messages) == 2 and not session.closed
    assert (b.pool.opened, b.pool.reused, b.pool.idle()) == (1, 1, 1)


def test_with_pipelining_the_rset_goes_out_with_the_next_mail() -> None:
    b = bench(pipelining=True)
    send(b, tag="one")
    [session] = b.upstream.sessions
    assert session.commands == TRANSACTION  # the RSET is owed
    session.hold_replies = True
    t = Transaction(b, ALICE, "two")
    assert session.commands[4:] == ["RSET", "MAIL FROM:<alice@example.com>"]
    assert not t.mail.called  # sent together, before either reply
    session.release_all()
    session.hold_replies = False
    assert t.finish() == QUEUED
    assert session.commands == TRANSACTION + ["RSET"] + TRANSACTION
    assert len(session.messages) == 2 and b.pool.reused == 1


def test_a_session_that_sent_nothing_is_kept_without_rset() -> None:
    b = bench()
    session = outcome(b.pool.connect(b.route, ALICE))
    session.quit()
    assert b.pool.idle() == 1 and b.upstream.sessions[0].commands == []


def test_with_session_idle_0_nothing_is_kept() -> None:
    b = bench(session_idle=0.0)
    send(b)
    send(b)
    assert [s.commands[-1] for s in b.upstream.sessions] == ["QUIT", "QUIT"]
    assert all(s.closed for s in b.upstream.sessions) and b.pool.idle() == 0


# One account's session never serves another.

def test_each_account_has_its_own_sessions() -> None:
    b = bench(max_sessions=4)
    sent = [send(b, account, f"{account.name} {n}")
            for n in range(3) for account in (ALICE, BOB, DAVE, DAVE_AGAIN)]
    assert len(b.upstream.sessions) == 4
    for t in sent:
        [carrier] = t.carriers()
        assert carrier.account == t.account
    for session in b.upstream.sessions:
        assert {m.sender for m in session.transmissions} == {
            f"{session.account.name.split(':')[-1]}@example.com"}


def test_a_passthrough_password_is_part_of_the_key() -> None:
    b = bench()
    send(b, DAVE)
    t = send(b, DAVE_AGAIN)
    [carrier] = t.carriers()
    assert carrier.account.password == Secret("other")
    assert len(b.upstream.sessions) == 2


# The limits.

def test_an_idle_session_is_closed_after_session_idle() -> None:
    b = bench()
    send(b)
    [first] = b.upstream.sessions
    b.clock.advance(29.9)
    assert not first.closed
    send(b)  # taken again: the idle time starts anew
    b.clock.advance(29.9)
    assert not first.closed and len(b.upstream.sessions) == 1
    b.clock.advance(0.1)
    assert first.closed and first.commands[-1] == "QUIT" and b.pool.idle() == 0
    send(b)
    assert len(b.upstream.sessions) == 2


def test_a_session_carries_at_most_max_messages() -> None:
    b = bench(max_messages=2)
    for n in range(5):
        send(b, tag=str(n))
    assert [len(s.messages) for s in b.upstream.sessions] == [2, 2, 1]
    assert [s.closed for s in b.upstream.sessions] == [True, True, False]
    assert b.upstream.sessions[0].commands[-2:] == [".", "QUIT"]  # no RSET: it is done


def test_idle_sessions_count_against_max_sessions_and_make_room() -> None:
    b = bench(max_sessions=2)
    send(b, ALICE)
    send(b, BOB)
    assert b.pool.idle() == 2 and len(b.upstream.open_sessions) == 2
    t = send(b, CAROL)  # no free slot: the longest idle session (ALICE's) is closed
    alice, bob, carol = b.upstream.sessions
    assert alice.closed and not bob.closed and t.carriers() == [carol]
    assert b.most_open == 2


def test_a_session_whose_rset_fails_at_once_is_not_kept() -> None:
    b = bench(max_sessions=2)
    old = kept_session(b)
    old.fail_at = "reset"  # the connection is gone when the next RSET is sent
    send(b, ALICE, "second")
    assert b.pool.idle() == 0 and not old.usable
    send(b, BOB)
    send(b, CAROL)  # both slots were free or freed: no wait
    assert b.upstream.sessions[-1].account == CAROL


def test_making_room_closes_a_live_session_not_a_dead_one() -> None:
    b = bench(max_sessions=2)
    send(b, ALICE)
    b.clock.advance(1)
    send(b, BOB)
    b.clock.advance(1)
    send(b, CAROL)  # makes room: ALICE's session closes
    alice, bob, carol = b.upstream.sessions
    bob.fail()  # the upstream dropped it while idle; it is still in the pool's list
    b.clock.advance(1)
    send(b, ALICE)  # a free slot: no room needed
    b.clock.advance(1)
    t = send(b, DAVE)  # dropping BOB's dead session would free nothing
    assert t.carriers()[0].account == DAVE and carol.closed


def test_a_waiting_transaction_gets_the_session_its_account_hands_back() -> None:
    b = bench(max_sessions=1)
    first = Transaction(b, ALICE, "first")
    second = Transaction(b, ALICE, "second")
    assert outcome(first.mail).positive and not second.mail.called
    assert first.finish() == QUEUED
    assert second.finish() == QUEUED
    [session] = b.upstream.sessions
    assert len(session.messages) == 2 and b.most_open == 1


def test_a_waiting_transaction_of_another_account_gets_the_slot() -> None:
    b = bench(max_sessions=1)
    first = Transaction(b, ALICE, "first")
    second = Transaction(b, BOB, "second")
    assert not second.mail.called
    assert first.finish() == QUEUED
    assert second.finish() == QUEUED
    alice, bob = b.upstream.sessions
    assert alice.closed and second.carriers() == [bob] and b.most_open == 1


def test_a_transaction_waits_session_wait_seconds_at_most() -> None:
    b = bench(max_sessions=1, session_wait=10.0)
    first = Transaction(b, ALICE, "first")
    second = Transaction(b, ALICE, "second")
    b.clock.advance(10)
    reply = second.finish()
    assert (reply.code, reply.enhanced) == (451, "4.3.2") and "1 sessions open" in reply.text
    assert first.finish() == QUEUED  # and the first is not disturbed
    assert len(b.upstream.sessions) == 1


@pytest.mark.parametrize("lifetime", [TOKEN_MARGIN + 40, TOKEN_MARGIN])
def test_an_oauth_session_is_kept_only_while_its_token_is_good(lifetime: float) -> None:
    b = bench(session_idle=300.0)
    b.upstream.valid_until = b.clock.seconds() + lifetime
    send(b)
    [session] = b.upstream.sessions
    if lifetime <= TOKEN_MARGIN:
        assert session.closed and b.pool.idle() == 0
        return
    b.clock.advance(39.9)
    assert not session.closed
    b.clock.advance(0.1)  # 60 s before the token expires
    assert session.closed and b.pool.idle() == 0


def test_drain_and_stop_close_the_idle_sessions() -> None:
    b = bench()
    send(b, ALICE)
    send(b, BOB)
    outcome(b.pool.drain())
    assert all(s.closed for s in b.upstream.sessions)
    send(b)  # still pooling after a drain
    assert b.pool.idle() == 1
    outcome(b.pool.stop())
    send(b)
    assert all(s.closed for s in b.upstream.sessions)


# Dead kept sessions: replaced before MAIL FROM is accepted, never after.

def kept_session(b: Bench) -> FakeUpstreamSession:
    send(b, tag="before")
    [session] = b.upstream.open_sessions
    return session


@pytest.mark.parametrize("pipelining", [False, True], ids=["rset-at-hand-back", "pipelined"])
@pytest.mark.parametrize("death", ["lost while idle", "no answer to MAIL", "421 to MAIL"])
def test_a_dead_kept_session_is_replaced_silently(death: str, pipelining: bool) -> None:
    b = bench(pipelining)
    old = kept_session(b)
    if death == "lost while idle":
        old.fail()
    elif death == "no answer to MAIL":
        old.fail_at = "mail"
    else:
        old.replies["mail"] = LOST_MAIL
    t = Transaction(b, ALICE, "after")
    assert t.finish() == QUEUED
    _, new = b.upstream.sessions
    assert t.carriers() == [new] and [len(s.messages) for s in (old, new)] == [1, 1]
    assert not old.usable


@pytest.mark.parametrize("death", ["421 to RSET", "RSET lost"])
def test_a_kept_session_whose_rset_fails_is_replaced(death: str) -> None:
    b = bench()
    first = Transaction(b, ALICE, "before")
    assert outcome(first.mail).positive
    assert outcome(first.t.rcpt(RECIPIENT, {})).positive
    assert outcome(first.t.data(Producer())).code == 354
    first.t.write([first.body])
    [old] = b.upstream.sessions
    old.hold_replies = True
    done = first.t.finish()
    old.release()  # the final dot's reply; the RSET goes out and waits for its own
    assert outcome(done) == QUEUED and old.commands[-1] == "RSET"
    second = Transaction(b, ALICE, "after")
    assert not second.mail.called  # MAIL FROM waits for the RSET's reply
    if death == "421 to RSET":
        old.replies["reset"] = LOST_MAIL
        old.release()
    else:
        old.fail()
    assert second.finish() == QUEUED
    _, new = b.upstream.sessions
    assert second.carriers() == [new] and [len(s.messages) for s in (old, new)] == [1, 1]
    assert old.commands.count("MAIL FROM:<alice@example.com>") == 1


@pytest.mark.parametrize("death", ["421 to RSET", "RSET lost"])
def test_a_kept_session_whose_pipelined_rset_fails_is_replaced(death: str) -> None:
    b = bench(pipelining=True)
    old = kept_session(b)
    if death == "421 to RSET":
        old.replies["reset"] = LOST_MAIL
    else:
        old.fail_at = "reset"
    t = Transaction(b, ALICE, "after")
    assert t.finish() == QUEUED
    _, new = b.upstream.sessions
    assert t.carriers() == [new] and [len(s.transmissions) for s in (old, new)] == [1, 1]
    assert not old.usable


@pytest.mark.parametrize("pipelining", [False, True], ids=["rset-at-hand-back", "pipelined"])
@pytest.mark.parametrize("step", ["rcpt", "data", "end_data"])
def test_a_kept_session_lost_after_mail_is_never_retried(step: str, pipelining: bool) -> None:
    b = bench(pipelining)
    old = kept_session(b)
    old.fail_at = step
    t = Transaction(b, ALICE, "after")
    reply = t.finish()
    assert (reply.code, reply.enhanced) == (451, "4.4.2")
    assert t.carriers() == [] and len(b.upstream.sessions) == 1
    assert "MAIL FROM:<alice@example.com>" in old.commands[5:]


def test_a_refusal_of_mail_on_a_kept_session_is_passed_on() -> None:
    b = bench()
    old = kept_session(b)
    old.replies["mail"] = Reply(550, "5.7.1", "Sender refused")
    t = Transaction(b, ALICE, "after")
    assert t.finish() == Reply(550, "5.7.1", "Sender refused")
    assert len(b.upstream.sessions) == 1 and t.carriers() == []


def test_the_client_leaving_while_a_replacement_connects() -> None:
    b = bench()
    old = kept_session(b)
    old.fail_at = "mail"
    b.upstream.hold_connects = True
    t = Transaction(b, ALICE, "after")
    assert not t.mail.called
    t.t.abort()
    b.upstream.release_connects()
    new = b.upstream.sessions[1]
    assert isinstance(outcome(t.mail), Failure)
    assert new.commands == [] and b.pool.idle() == 1  # kept for the next transaction
    assert b.upstream.messages[1:] == []


FAILURES = ["none", "idle lost", "mail lost", "mail 421", "rset 421", "reset lost", "rcpt lost",
            "data lost", "end_data lost", "end_data refused"]


@given(st.lists(st.tuples(st.sampled_from([ALICE, BOB, CAROL, DAVE, DAVE_AGAIN]),
                          st.sampled_from(FAILURES),
                          st.sampled_from([0.0, 5.0, 31.0])), min_size=1, max_size=25),
       st.booleans())
def test_no_message_is_ever_lost_duplicated_or_sent_for_another_account(
        steps: list[tuple[UpstreamAccount, str, float]], pipelining: bool) -> None:
    b = bench(pipelining, max_sessions=3, max_messages=4)
    for number, (account, failure, pause) in enumerate(steps):
        b.clock.advance(pause)
        kept = [s for s in b.upstream.open_sessions if s.account == account]
        for session in kept:
            if failure == "idle lost":
                session.fail()
            elif failure == "mail 421":
                session.replies["mail"] = LOST_MAIL
            elif failure == "rset 421":
                session.replies["reset"] = LOST_MAIL
            elif failure == "end_data refused":
                session.replies["end_data"] = Reply(554, "5.7.1", "spam")
            elif failure.endswith(" lost"):
                session.fail_at = failure.split()[0]
        t = Transaction(b, account, f"message {number}")
        reply = t.finish()
        carriers = t.carriers()
        if reply.positive:
            assert len(carriers) == 1 and carriers[0].account == account
        else:
            assert carriers == []
            assert kept and failure in ("rcpt lost", "data lost", "end_data lost",
                                        "end_data refused")
        for session in b.upstream.sessions:
            for step in ("mail", "reset", "end_data"):
                session.replies.pop(step, None)
            session.fail_at = None
        assert b.most_open <= 3
    for session in b.upstream.sessions:
        assert all(m.sender.startswith(session.account.name.split(":")[-1])
                   for m in session.transmissions)
        assert len(session.transmissions) <= 4


# Against aiosmtpd, through the bridge.

def drop_connections(upstream: Upstream) -> None:
    """The upstream drops every connection it has (and keeps listening)."""
    done = threading.Event()

    def drop() -> None:
        upstream.controller.cancel_tasks(stop_loop=False)
        done.set()

    upstream.controller.loop.call_soon_threadsafe(drop)
    assert done.wait(10)


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_the_bridge_logs_in_once_for_many_messages(relay: Relay, upstream: Upstream,
                                                  certificate: tuple[str, str]) -> None:
    bridge = relay(upstream)
    for n in range(3):
        with smtps(bridge, certificate) as client:
            assert client.sendmail("scanner@example.com", [RECIPIENT],
                                   f"Subject: {n}\r\n\r\nhi\r\n".encode()) == {}
    assert [m.sent for m in upstream.stored()] == [
        f"Subject: {n}\r\n\r\nhi\r\n".encode() for n in range(3)]
    assert upstream.logins == [("PLAIN", upstream.username, True)]
    wait_for(lambda: upstream.under_tls().count(b"RSET\r\n") == 3)


def test_the_bridge_replaces_a_session_the_upstream_dropped(
        relay: Relay, upstream: Upstream, certificate: tuple[str, str]) -> None:
    bridge = relay(upstream)
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail("a@example.com", [RECIPIENT], b"Subject: 1\r\n\r\n") == {}
        drop_connections(upstream)
        # The same client session goes on, and sees nothing of it.
        assert client.sendmail("a@example.com", [RECIPIENT], b"Subject: 2\r\n\r\n") == {}
    assert [m.sent for m in upstream.stored()] == [b"Subject: 1\r\n\r\n",
                                                   b"Subject: 2\r\n\r\n"]
    assert len(upstream.logins) == 2


def test_mail_without_an_answer_on_a_kept_session(reactor: Any, upstream: Upstream) -> None:
    """The upstream gets MAIL FROM (or the RSET before it) on the kept session and drops
    the connection before it answers: a new session carries the message, exactly once."""
    pool = SessionPool(UpstreamConnector(reactor, "bridge.test"), reactor)
    route, account = upstream.route(), upstream.account()
    controller = upstream.controller
    held, go_on = threading.Event(), threading.Event()

    def call(function: Callable[..., Any], *args: Any) -> Any:
        return blockingCallFromThread(reactor, function, *args)

    def message(session: Any, tag: bytes) -> Reply:
        assert call(session.rcpt, RECIPIENT, {}).code == 250
        assert call(session.data, Producer()).code == 354
        call(session.write_lines, [b"Subject: " + tag])
        reply: Reply = call(session.end_data)
        call(session.quit)
        return reply

    def hold() -> None:
        held.set()
        go_on.wait(10)
        controller.cancel_tasks(stop_loop=False)

    try:
        first = call(pool.connect, route, account)
        assert call(first.mail, "a@example.com", {}).code == 250
        assert message(first, b"one").code == 250
        second = call(pool.connect, route, account)
        assert second.reused
        controller.loop.call_soon_threadsafe(hold)
        assert held.wait(10)
        [pending] = call(lambda: [second.mail("a@example.com", {})])
        go_on.set()
        assert call(lambda: pending).code == 250
        assert message(second, b"two").code == 250
    finally:
        go_on.set()
        call(pool.stop)
    assert [m.content for m in upstream.stored()] == [b"Subject: one\r\n", b"Subject: two\r\n"]
    assert len(upstream.logins) == 2


def test_sighup_and_stopping_close_the_kept_sessions(
        reactor: Any, relay_toml: Callable[..., str], upstream: Upstream,
        certificate: tuple[str, str], tmp_path: Any) -> None:
    bridge = start_bridge(reactor, relay_toml(upstream), str(tmp_path))
    try:
        for n in range(2):
            with smtps(bridge, certificate) as client:
                assert client.sendmail("a@example.com", [RECIPIENT], b"Subject: x\r\n\r\n") == {}
            if n == 0:
                wait_for(lambda: upstream.under_tls().count(b"RSET\r\n") == 1)
                reloader = bridge.service.getServiceNamed("certificates")
                assert blockingCallFromThread(reactor, reloader.reload)
                wait_for(lambda: upstream.under_tls().count(b"QUIT\r\n") == 1)
        wait_for(lambda: upstream.under_tls().count(b"RSET\r\n") == 2)
    finally:
        stop_bridge(reactor, bridge)
    assert upstream.under_tls().count(b"QUIT\r\n") == 2
    assert len(upstream.logins) == 2


def test_a_pipelining_upstream_gets_rset_with_the_next_mail(
        bridge: RunningBridge, demo_upstream: DemoUpstream, certificate: tuple[str, str],
        logged: list[str]) -> None:
    """The demo upstream (the bridge's own server) offers PIPELINING: one login, the RSET
    of the kept session sent along with each next MAIL FROM, every message stored once."""
    for n in range(3):
        with smtps(bridge, certificate) as client:
            assert client.sendmail("a@example.com", [RECIPIENT],
                                   f"Subject: {n}\r\n\r\nhi\r\n".encode()) == {}
    assert demo_upstream.messages() == [f"Subject: {n}\r\n\r\nhi\r\n".encode()
                                        for n in range(3)]
    texts = logged[::3]  # each event's formatted text
    assert sum("upstream" in text and "authenticated as" in text for text in texts) == 1
    assert not any("kept session is gone" in text for text in texts)
