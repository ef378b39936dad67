"""Process-wide limits: the listeners' descriptor budget, the password-check pool, the
listen backlog."""

from __future__ import annotations

import resource
import threading
import time
from typing import Any

import pytest
from twisted.internet.defer import DeferredSemaphore
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread

from smtpbridge.errors import SMTPReplyError
from smtpbridge.limits import (
    RESERVE,
    BoundedThreadPool,
    ConnectionGovernor,
    FlatRelease,
    raise_file_limit,
)
from smtpbridge.service import _with_backlog


class Port:
    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:  # noqa: N802
        self.reading = False

    def startReading(self) -> None:  # noqa: N802
        self.reading = True


def test_the_governor_pauses_every_port_before_descriptors_run_out() -> None:
    governor = ConnectionGovernor(1024)
    assert governor.high == (1024 - RESERVE) // 2
    ports = [Port(), Port()]
    for port in ports:
        governor.add_port(port)
    governor.add_port(object())  # a port that cannot pause is left alone
    for _ in range(governor.high - 1):
        governor.opened()
    assert all(port.reading for port in ports)
    governor.opened()
    assert not any(port.reading for port in ports)
    while governor.open > governor.low + 1:
        governor.closed()
    assert not any(port.reading for port in ports)  # hysteresis: not at once
    governor.closed()
    assert all(port.reading for port in ports)


def test_a_port_added_while_paused_starts_paused() -> None:
    governor = ConnectionGovernor(RESERVE + 4)
    governor.opened()
    governor.opened()
    port = Port()
    governor.add_port(port)
    assert not port.reading


def test_the_soft_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = raise_file_limit()
    assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard


@pytest.mark.parametrize("description, expected", [
    ("tcp:465", "tcp:465:backlog=511"),
    ("tcp:465:interface=127.0.0.1", "tcp:465:interface=127.0.0.1:backlog=511"),
    ("tcp6:465", "tcp6:465:backlog=511"),
    ("haproxy:tcp:465", "haproxy:tcp:465:backlog=511"),
    ("unix:/run/smtpbridge.sock", "unix:/run/smtpbridge.sock:backlog=511"),
    ("tcp:465:backlog=50", "tcp:465:backlog=50"),  # the string's own setting wins
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # systemd sets it
])
def test_the_listen_backlog(description: str, expected: str) -> None:
    assert _with_backlog(description, 511) == expected


def test_the_password_pool_refuses_beyond_its_queue(reactor: Any) -> None:
    pool = BoundedThreadPool(reactor, threads=1, queue=1, name="test-checks")
    release = threading.Event()
    results: list[Any] = []

    def slow() -> str:
        release.wait(10)
        return "checked"

    def start_three() -> None:
        pool.startService()
        for _ in range(3):
            pool.run(slow).addBoth(results.append)

    try:
        blockingCallFromThread(reactor, start_three)
        [refused] = results  # the third at once: one runs, one waits, no more
        assert refused.check(SMTPReplyError)
        assert (refused.value.reply.code, refused.value.reply.enhanced) == (454, "4.7.0")
        release.set()
        for _ in range(200):
            if len(results) == 3:
                break
            time.sleep(0.05)
        assert results[1:] == ["checked", "checked"]
        assert pool.busy == 0
    finally:
        release.set()
        blockingCallFromThread(reactor, pool.stopService)


def test_a_chain_of_waiters_that_give_the_token_back_at_once_does_not_nest() -> None:
    clock = Clock()
    release = FlatRelease(clock)
    semaphore = DeferredSemaphore(1)
    ran: list[int] = []
    semaphore.acquire()  # the token is taken
    for number in range(5000):  # each waiter finds nothing to do and gives it back
        semaphore.acquire().addCallback(
            lambda _, number=number: (ran.append(number), release(semaphore)))
    release(semaphore)
    assert ran == [0]  # the next one runs at once; the others a turn later each
    clock.advance(0)
    assert ran == list(range(5000))
    assert semaphore.tokens == 1 and not semaphore.waiting
