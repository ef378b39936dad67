"""Every transaction that waits for a slot of its host gets the slot a session handed
back frees, not only one that a kept session of its own account would do for: a
passthrough login check (a new login) and the replacement of a dead kept session too."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from tests.test_pool import ALICE, BOB, CAROL, DAVE, Bench, Transaction, bench, outcome, send


@pytest.mark.parametrize("connect", [
    pytest.param(lambda b: b.pool.connect(b.route, BOB), id="another account"),
    pytest.param(lambda b: b.pool.fresh.connect(b.route, DAVE), id="a login check"),
    pytest.param(lambda b: b.pool.fresh.connect(b.route, ALICE), id="a new login of the same"),
])
def test_a_session_handed_back_makes_room_for_whoever_waits(connect: Any) -> None:
    b = bench(max_sessions=1, session_wait=10.0, session_idle=30.0)
    first = Transaction(b, ALICE, "first")
    assert outcome(first.mail).positive  # the host's one slot is in use
    waiting: Deferred[Any] = connect(b)
    assert not waiting.called
    first.finish()  # handed back: closed, so that the slot goes to the one waiting
    assert waiting.called and not isinstance(outcome(waiting), Failure)
    assert b.pool.idle() == 0


def test_the_replacement_of_a_dead_session_gets_a_slot_handed_back(b: Bench) -> None:
    send(b, ALICE, "before")  # kept idle
    [alices] = b.upstream.sessions
    bobs = Transaction(b, BOB, "bob")
    assert outcome(bobs.mail).positive  # both slots in use now
    alices.hold_replies = True
    alice = Transaction(b, ALICE, "alice")  # takes her kept session; MAIL unanswered
    carol = Transaction(b, CAROL, "carol")  # waits for a slot
    alices.fail()  # dead at MAIL: its slot goes to Carol, Alice's replacement waits
    assert outcome(carol.mail).positive and not alice.mail.called
    assert bobs.finish().code == 250  # handed back: its slot goes to the replacement
    assert alice.mail.called and outcome(alice.mail).positive


@pytest.fixture
def b() -> Bench:
    return bench(max_sessions=2, session_wait=10.0, session_idle=30.0)
