"""The queue runner beside the operator's queue commands and a disk that fails: the
space it counts, a hold, an attempt that breaks, a bounce it cannot queue, its retries."""

from __future__ import annotations

import errno
import itertools
import os
from typing import Any

import pytest
from twisted.internet.defer import fail

from smtpbridge.model import Assignment, Reply, Route, UpstreamAccount
from smtpbridge.secret import Secret
from smtpbridge.spool import Spool
from smtpbridge.testing import unreachable
from tests.test_spool import ACCOUNT, BODY, CLIENT, ROUTE, Runner, result


@pytest.fixture
def spool(tmp_path: Any) -> Spool:
    spool = Spool(str(tmp_path / "spool"), 10 * 1024 * 1024)
    spool.prepare()
    return spool


def test_a_message_deleted_by_the_queue_command_frees_its_space_in_the_bridge(
        spool: Spool) -> None:
    t = Runner(spool, first_retry=3600, max_retry=3600)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    queue_id = t.keep()
    t.run()
    assert spool.stored > 0
    command = Spool(spool.directory, spool.max_size)  # what `smtpbridge queue` builds
    with command.locked(queue_id) as data:
        assert data is not None
        command.remove(queue_id)
    command.request_flush(queue_id)
    t.runner.flush()  # its SIGUSR1
    t.run()
    assert spool.ids() == [] and spool.stored == 0
    t.run(3600)  # and nothing is counted twice
    assert spool.stored == 0 and len(t.upstream.attempts) == 1
    assert spool.sizes == {}  # nothing kept of the message either


def test_a_message_held_while_it_waits_for_its_turn_is_not_delivered(spool: Spool) -> None:
    t = Runner(spool, concurrency=1)
    t.upstream.hold_connects = True
    t.keep()
    second = t.keep()
    t.run()
    assert len(t.upstream.attempts) == 1  # the first has the route's one turn
    spool.hold(second)
    t.upstream.hold_connects = False
    t.upstream.release_connects()
    t.run()
    t.run()
    assert len(t.upstream.messages) == 1 and spool.ids() == [second]
    spool.hold(second, on=False)
    spool.request_flush(second)
    t.runner.flush()
    t.run()
    assert len(t.upstream.messages) == 2 and spool.ids() == []


def test_an_attempt_that_breaks_is_made_again_later(spool: Spool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    t = Runner(spool, first_retry=300, max_retry=300)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    queue_id = t.keep()

    def full_disk(envelope: object) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "update", full_disk)
    t.run()
    assert len(t.upstream.attempts) == 1 and spool.ids() == [queue_id]
    monkeypatch.undo()
    del t.upstream.connect_errors[ROUTE.host]
    t.run(299)
    assert len(t.upstream.attempts) == 1
    t.run(1)
    assert len(t.upstream.messages) == 1 and spool.ids() == []
    assert t.runner._broken == {} and spool.sizes == {}  # nothing kept once delivered


def test_a_refusal_whose_bounce_cannot_be_queued_keeps_the_message(spool: Spool) -> None:
    t = Runner(spool, first_retry=300, max_retry=300)
    t.upstream.replies["rcpt:office@example.com"] = Reply(550, "5.1.1", "No such user")
    queue_id = t.keep()
    blocking = t.runner._run_blocking
    t.runner._run_blocking = lambda call, *args: (  # no commit goes through
        fail(OSError(errno.ENOSPC, "disk full")) if call.__name__ == "commit"
        else blocking(call, *args))
    t.run()
    assert spool.ids() == [queue_id]  # no bounce, so the message stays
    envelope = spool.load(queue_id)
    assert envelope is not None and envelope.recipients == ("office@example.com",)
    assert envelope.last_error == "550 5.1.1 No such user; its bounce could not be queued"
    t.runner._run_blocking = blocking  # room again: the bounce goes out next time
    t.run(300)
    t.run()
    [bounce] = t.upstream.messages  # queued, then delivered at once
    assert bounce.recipients == ["scanner@example.com"]
    assert b"multipart/report" in bounce.body
    assert spool.ids() == []


def test_an_unreadable_message_deleted_by_the_queue_command_frees_its_space(
        spool: Spool) -> None:
    with open(spool.path("00000000DEADBEEF"), "wb") as f:
        f.write(b"not a spool file" * 100)
    t = Runner(spool)
    t.runner.startService()  # it says so, and goes on
    t.run()
    assert spool.stored == 1600 and t.upstream.attempts == []
    command = Spool(spool.directory, spool.max_size)
    with command.locked("00000000DEADBEEF", read=False) as data:
        assert data is not None
        command.remove("00000000DEADBEEF")
    command.request_flush("00000000DEADBEEF")
    t.runner.flush()
    t.run()
    assert spool.ids() == [] and spool.stored == 0
    t.runner.stopService()


def test_a_new_state_is_written_outside_the_reactors_thread(spool: Spool) -> None:
    """Its fsyncs run where the commits do: the reactor never waits on the disk."""
    t = Runner(spool, first_retry=300, max_retry=300)
    t.upstream.replies["rcpt:office@example.com"] = Reply(451, "4.2.1", "Later")
    queue_id = t.keep()
    blocking, called = t.runner._run_blocking, []
    t.runner._run_blocking = lambda call, *args: (called.append(call.__name__),
                                                  blocking(call, *args))[1]
    t.run()
    assert called == ["update"]
    envelope = spool.load(queue_id)
    assert envelope is not None and envelope.last_error == "451 4.2.1 Later"


def test_the_retries_after_an_in_line_try_double(spool: Spool) -> None:
    t = Runner(spool, first_retry=300, max_retry=100_000)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    writer = t.runner.writer()
    writer.write(BODY)
    result(t.runner.keep(writer, "a@example.com", ["b@example.com"], ACCOUNT, {}, CLIENT))
    started, tried = t.clock.seconds(), []
    while len(tried) < 3:
        t.run(50)
        if len(t.upstream.attempts) > len(tried):
            tried.append(t.clock.seconds() - started)
    assert tried == [300, 900, 2100]  # after 300 s (the in-line try was the first), 600, 1200


def test_a_start_forgets_the_markers_of_messages_gone(spool: Spool) -> None:
    t = Runner(spool)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    kept = t.keep()
    for marker in ("hold", "flush"):
        for name in (kept, "GONE", "all"):
            with open(os.path.join(spool.directory, marker, name), "w"):
                pass
    spool.prepare()
    assert spool.held(kept) and not spool.held("GONE")
    assert spool.take_flush_requests() == {kept, "all"}


def test_two_queue_commands_signalled_at_once_flush_only_what_they_named(
        spool: Spool) -> None:
    from smtpbridge.queuerunner import SIGNAL_SETTLE

    t = Runner(spool, first_retry=3600, max_retry=3600)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    one, two, three = t.keep(), t.keep(), t.keep()
    t.run()
    assert len(t.upstream.attempts) == 3
    command = Spool(spool.directory, spool.max_size)
    for gone in (one, two):  # two deletes, two signals; one flush takes both requests
        with command.locked(gone):
            command.remove(gone)
        command.request_flush(gone)
    t.runner.flush()
    t.runner.flush()  # the second signal: nothing to do, three is not tried early
    t.run()
    assert len(t.upstream.attempts) == 3 and spool.ids() == [three]
    t.run(SIGNAL_SETTLE)
    t.runner.flush()  # a bare signal later: every message, as before
    t.run()
    assert len(t.upstream.attempts) == 4


def test_attempts_that_keep_breaking_are_made_on_the_doubling_schedule(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    t = Runner(spool, first_retry=300, max_retry=100_000)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)

    def full_disk(envelope: object) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "update", full_disk)
    t.keep()
    tried: list[float] = []
    while len(tried) < 5:
        t.run(50)
        if len(t.upstream.attempts) > len(tried):
            tried.append(t.clock.seconds())
    assert [b - a for a, b in itertools.pairwise(tried)] == [300, 600, 1200, 2400]


def test_many_messages_held_while_they_wait_for_their_turn_leave_it_free(
        spool: Spool) -> None:
    t = Runner(spool, concurrency=1)
    t.upstream.hold_connects = True
    first, *waiting = [t.keep() for _ in range(400)]
    t.run()
    assert len(t.upstream.attempts) == 1  # the first has the route's one turn
    for queue_id in waiting:  # (an administrator's loop of `queue hold`)
        spool.hold(queue_id)
    t.upstream.hold_connects = False
    t.upstream.release_connects()
    t.run()  # each waiter finds its message held and hands the turn on
    assert len(t.upstream.messages) == 1 and spool.ids() == sorted(waiting)
    spool.hold(waiting[0], on=False)
    spool.request_flush(waiting[0])
    t.runner.flush()
    t.run()
    assert len(t.upstream.messages) == 2  # the turn is free again


def test_a_session_that_connects_after_the_runner_stopped_sends_nothing(
        spool: Spool) -> None:
    t = Runner(spool)
    t.upstream.hold_connects = True
    queue_id = t.keep()
    t.run()
    assert len(t.upstream.attempts) == 1  # connecting
    t.runner.stopService()  # (it aborts the sessions it knows: none yet)
    t.upstream.release_connects()
    t.run()
    [session] = t.upstream.sessions
    assert session.commands == ["QUIT"]  # no MAIL FROM: quit at once
    envelope = spool.load(queue_id)
    assert envelope is not None and envelope.attempts == 0  # no attempt is counted


def test_two_routes_to_one_host_each_have_their_turns(spool: Spool) -> None:
    """``concurrency`` is per route: two routes of the configuration that name the same
    host (say, two accounts' different settings) do not share it."""
    first = Route("smtp.example.com", 587, name="office")
    second = Route("smtp.example.com", 587, name="scans")
    other = UpstreamAccount("other@example.com", Secret("pw"), name="other")
    t = Runner(spool, routes=(first,), more=(Assignment((second,), other),), concurrency=1)
    t.upstream.hold_replies = True
    t.keep()
    t.account = other
    t.keep()
    t.run()
    assert len(t.upstream.open_sessions) == 2  # one each, at once
