"""Tests for smtpbridge.throttle: AUTH failure delays and temporary blocks per address."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from smtpbridge.networks import normalise_address
from smtpbridge.throttle import AuthThrottle, ThrottleSettings

ADDRESS = "192.0.2.1"
OTHER = "198.51.100.7"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """Log events from smtpbridge.throttle while the test runs."""
    captured: list[LogEvent] = []

    def observer(event: LogEvent) -> None:
        if event.get("log_namespace") == "smtpbridge.throttle":
            captured.append(event)

    globalLogPublisher.addObserver(observer)
    yield captured
    globalLogPublisher.removeObserver(observer)


def fail(throttle: AuthThrottle, address: str, times: int) -> list[float]:
    return [throttle.failed(address) for _ in range(times)]


def test_defaults() -> None:
    assert ThrottleSettings() == ThrottleSettings(
        failure_limit=10, window=600.0, block_time=900.0, delay_step=1.0, max_delay=10.0
    )


@pytest.mark.parametrize(
    "field", ["failure_limit", "window", "block_time", "delay_step", "max_delay"]
)
def test_settings_reject_negative(field: str) -> None:
    with pytest.raises(ValueError):
        ThrottleSettings(**{field: -1})


def test_delays_grow_and_cap(clock: Clock) -> None:
    settings = ThrottleSettings(failure_limit=0, delay_step=1.5, max_delay=5.0)
    throttle = AuthThrottle(clock, settings)
    assert fail(throttle, ADDRESS, 6) == [1.5, 3.0, 4.5, 5.0, 5.0, 5.0]
    assert throttle.failed(OTHER) == 1.5


def test_block_after_limit_and_expiry(clock: Clock, events: list[LogEvent]) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=3, block_time=100.0))
    fail(throttle, ADDRESS, 2)
    assert throttle.blocked(ADDRESS) == 0.0
    assert events == []
    clock.advance(5)
    throttle.failed(ADDRESS)
    assert throttle.blocked(ADDRESS) == 100.0
    assert throttle.blocked(OTHER) == 0.0
    assert len(events) == 1
    clock.advance(99)
    assert throttle.blocked(ADDRESS) == 1.0
    clock.advance(1)
    assert throttle.blocked(ADDRESS) == 0.0


def test_failures_during_block_do_not_extend_it(clock: Clock, events: list[LogEvent]) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=2, block_time=100.0))
    fail(throttle, ADDRESS, 2)
    clock.advance(50)
    throttle.failed(ADDRESS)
    assert throttle.blocked(ADDRESS) == 50.0
    assert len(events) == 1


def test_block_log_line(clock: Clock, events: list[LogEvent]) -> None:
    throttle = AuthThrottle(clock)
    fail(throttle, "::ffff:" + ADDRESS, 10)
    [event] = events
    assert formatEvent(event) == (
        "AUTH blocked for [192.0.2.1] for 900 s after 10 failures in 600 s"
    )
    assert event["log_level"].name == "warn"
    # Only the address and the counts travel with the event, nothing a login could leak.
    fields = {key for key in event if not key.startswith("log_")}
    assert fields == {"address", "block_time", "failures", "window"}


def test_window_slides(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=3, window=60.0))
    throttle.failed(ADDRESS)
    clock.advance(30)
    assert throttle.failed(ADDRESS) == 2.0
    clock.advance(30)
    # The first failure is now 60 s old and has left the window.
    assert throttle.failed(ADDRESS) == 2.0
    assert throttle.blocked(ADDRESS) == 0.0
    clock.advance(1)
    assert throttle.failed(ADDRESS) == 3.0
    assert throttle.blocked(ADDRESS) == 900.0


def test_success_clears_failures(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=3))
    fail(throttle, ADDRESS, 2)
    fail(throttle, OTHER, 2)
    throttle.succeeded(ADDRESS)
    assert throttle.failed(ADDRESS) == 1.0
    assert throttle.blocked(ADDRESS) == 0.0
    assert throttle.failed(OTHER) == 3.0


def test_success_keeps_block(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=3))
    fail(throttle, ADDRESS, 3)
    throttle.succeeded(ADDRESS)
    assert throttle.blocked(ADDRESS) == 900.0


@pytest.mark.parametrize(
    "spelling",
    ["::ffff:192.0.2.1", "::FFFF:c000:0201", "[::ffff:192.0.2.1]", " 192.0.2.1 "],
)
def test_mapped_ipv4_shares_counter(clock: Clock, spelling: str) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=3))
    fail(throttle, ADDRESS, 2)
    assert throttle.failed(spelling) == 3.0
    assert throttle.blocked(ADDRESS) == 900.0
    assert throttle.blocked(spelling) == 900.0


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("::1", "::1"),
        ("unix-socket", "unix-socket"),
        ("", ""),
    ],
)
def test_normalise_address(host: str, expected: str) -> None:
    assert normalise_address(host) == expected


def test_ipv6_addresses_are_separate(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=2))
    throttle.failed("2001:db8::1")
    throttle.failed("2001:db8::2")
    assert throttle.blocked("2001:db8::1") == 0.0
    throttle.failed("2001:0db8::1")
    assert throttle.blocked("2001:db8::1") == 900.0


def test_limit_zero_never_blocks(clock: Clock, events: list[LogEvent]) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=0))
    assert fail(throttle, ADDRESS, 50)[-1] == 10.0
    assert throttle.blocked(ADDRESS) == 0.0
    assert events == []


def test_delay_step_zero_never_waits(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=3, delay_step=0.0))
    assert fail(throttle, ADDRESS, 3) == [0.0, 0.0, 0.0]
    assert throttle.blocked(ADDRESS) == 900.0


def test_both_disabled_remembers_nothing(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=0, delay_step=0.0))
    assert fail(throttle, ADDRESS, 20) == [0.0] * 20
    assert throttle.blocked(ADDRESS) == 0.0
    assert throttle.tracked() == 0


def test_expired_addresses_are_pruned(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=2, window=60.0))
    for n in range(1000):
        throttle.failed(f"10.0.{n // 256}.{n % 256}")
    for n in range(10):
        fail(throttle, f"10.9.0.{n}", 2)
    assert throttle.tracked() == 1010
    clock.advance(60)
    throttle.failed(OTHER)
    # Failures have left the window; the ten blocks have not expired yet.
    assert throttle.tracked() == 11
    clock.advance(900)
    throttle.blocked(OTHER)
    assert throttle.tracked() == 0


def test_recent_failures_survive_pruning(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=3, window=60.0))
    throttle.failed(OTHER)
    clock.advance(30)
    fail(throttle, ADDRESS, 2)
    clock.advance(31)
    throttle.succeeded("203.0.113.5")
    assert throttle.tracked() == 1
    assert throttle.failed(ADDRESS) == 3.0


def test_address_count_is_capped(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=2), max_addresses=100)
    fail(throttle, ADDRESS, 1)
    for n in range(500):
        throttle.failed(f"10.0.{n // 256}.{n % 256}")
        assert throttle.tracked() <= 100
    # The least recently seen address went first.
    assert throttle.failed(ADDRESS) == 1.0
    for n in range(500):
        fail(throttle, f"10.1.{n // 256}.{n % 256}", 2)
        assert throttle.tracked() <= 200


def test_failures_per_address_are_capped(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=0, max_delay=10.0))
    fail(throttle, ADDRESS, 10_000)
    assert throttle.tracked() == 1
    assert max(len(times) for times in throttle._failures.values()) == 10


def test_delay_fires_after_clock_advance(clock: Clock) -> None:
    throttle = AuthThrottle(clock)
    fired: list[None] = []
    throttle.delay(3.0).addCallback(fired.append)
    clock.advance(2.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [None]
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("seconds", [0, 0.0, -1.0])
def test_delay_zero_has_fired(clock: Clock, seconds: float) -> None:
    fired: list[None] = []
    AuthThrottle(clock).delay(seconds).addCallback(fired.append)
    assert fired == [None]
    assert clock.getDelayedCalls() == []


def test_delay_cancel_stops_timer(clock: Clock) -> None:
    d = AuthThrottle(clock).delay(5.0)
    errors: list[object] = []
    d.addErrback(errors.append)
    d.cancel()
    assert clock.getDelayedCalls() == []
    assert len(errors) == 1
    assert errors[0].check(CancelledError)  # type: ignore[attr-defined]


# Attempts counted before their check, and the bridge's ceiling.

def test_parallel_attempts_count_before_their_verdict(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=3, rate=0))
    assert [throttle.begin(ADDRESS) for _ in range(5)] == [None, None, None, "busy", "busy"]
    assert throttle.begin(OTHER) is None  # another address is not affected
    throttle.end(ADDRESS, ok=None)  # no verdict: the slot is free again, nothing counted
    assert throttle.begin(ADDRESS) is None
    for _ in range(3):
        throttle.end(ADDRESS, ok=False)
    assert throttle.begin(ADDRESS) == "blocked"


def test_a_success_frees_its_slot_and_the_failures(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=2, rate=0))
    assert throttle.begin(ADDRESS) is None
    assert throttle.end(ADDRESS, ok=False) > 0
    assert throttle.begin(ADDRESS) is None
    assert throttle.end(ADDRESS, ok=True) == 0.0
    assert [throttle.begin(ADDRESS) for _ in range(3)] == [None, None, "busy"]


def test_the_bridge_wide_ceiling_of_attempts_per_second(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=0, rate=5))
    verdicts = [throttle.begin(f"192.0.2.{n}") for n in range(8)]
    assert verdicts == [None] * 5 + ["rate"] * 3
    clock.advance(0.4)  # two more tokens
    assert [throttle.begin(f"198.51.100.{n}") for n in range(3)] == [None, None, "rate"]
    clock.advance(10)  # the bucket holds at most one second's attempts
    assert [throttle.begin(f"203.0.113.{n}") for n in range(6)].count(None) == 5


def test_an_address_refused_auth_is_shed_for_the_cool_down(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=2, rate=1, cool_down=10))
    assert throttle.begin("192.0.2.1") is None  # the one costly check of this second
    assert not throttle.shedding("192.0.2.1")
    assert throttle.begin("192.0.2.2") == "rate"
    assert throttle.shedding("192.0.2.2") and not throttle.shedding("192.0.2.1")
    clock.advance(9.9)
    assert throttle.shedding("192.0.2.2")
    clock.advance(0.1)
    assert not throttle.shedding("192.0.2.2")
    throttle.end("192.0.2.1", ok=False)  # a plain failure is no reason to shed
    assert not throttle.shedding("192.0.2.1")
    off = AuthThrottle(clock, ThrottleSettings(rate=1, cool_down=0))
    off.begin("192.0.2.3")
    assert off.begin("192.0.2.3") == "rate" and not off.shedding("192.0.2.3")


def test_the_shed_addresses_are_bounded(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(rate=0.001, cool_down=60),
                            max_addresses=3)
    throttle.begin("198.51.100.250")  # takes the only token
    for n in range(5):
        assert throttle.begin(f"198.51.100.{n}") == "rate"
    assert [throttle.shedding(f"198.51.100.{n}") for n in range(5)] == [
        False, False, True, True, True]


def test_a_rate_below_one_a_second_still_lets_attempts_through(clock: Clock) -> None:
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=0, rate=0.1))
    assert throttle.begin("192.0.2.1") is None
    assert throttle.begin("192.0.2.1") == "rate"
    clock.advance(9.9)
    assert throttle.begin("192.0.2.2") == "rate"
    clock.advance(0.1)
    assert throttle.begin("192.0.2.2") is None


def test_attempts_under_way_count_with_the_failures_of_the_window_only() -> None:
    clock = Clock()
    throttle = AuthThrottle(clock, ThrottleSettings(failure_limit=10, window=600, rate=0))
    for _ in range(5):
        throttle.failed("192.0.2.1")
    clock.advance(500)
    for _ in range(4):
        throttle.failed("192.0.2.1")
    clock.advance(150)  # the first five have left the window: four count
    assert throttle.begin("192.0.2.1") is None
    assert throttle.begin("192.0.2.1") is None  # 4 failures + 1 under way < 10
    assert not throttle.shedding("192.0.2.1")
    for _ in range(4):
        assert throttle.begin("192.0.2.1") is None
    assert throttle.begin("192.0.2.1") == "busy"  # 4 + 6 under way
