"""Rate limits: sliding windows on a fake clock, then real clients through a real upstream."""

from __future__ import annotations

import os
import random
import smtplib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from smtpbridge.config import parse_config
from smtpbridge.model import ClientInfo
from smtpbridge.ratelimit import RateLimits, RateLimitSettings, SlidingWindow
from tests.conftest import RunningBridge, start_bridge, stop_bridge
from tests.test_relay import RECIPIENT, SENDER, relay_toml, smtps
from tests.upstream import Upstream, commands, upstream, upstream_factory

FIXTURES = (relay_toml, upstream, upstream_factory)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_window_refuses_beyond_its_limit_and_forgets_in_time() -> None:
    clock = Clock()
    window = SlidingWindow(clock, limit=3, period=60, slices=12)
    for _ in range(3):
        assert window.allows("a")
        window.add("a")
    assert not window.allows("a")
    assert window.allows("b")  # keys are apart
    clock.advance(60)
    assert not window.allows("a")  # a slice may count a little longer, never shorter
    clock.advance(5)
    assert window.allows("a")
    assert len(window) == 0  # nothing left to remember


def test_no_period_ever_holds_more_than_the_limit() -> None:
    clock = Clock()
    window = SlidingWindow(clock, limit=5, period=60, slices=12)
    rng = random.Random(13)
    accepted: list[float] = []
    for _ in range(2000):
        clock.advance(rng.expovariate(1 / 4))
        if window.allows("k"):
            window.add("k")
            accepted.append(clock.seconds())
    assert len(accepted) > 100
    for index, start in enumerate(accepted):
        within = [t for t in accepted[index:index + 10] if t < start + 60]
        assert len(within) <= 5


def test_memory_stays_bounded() -> None:
    clock = Clock()
    window = SlidingWindow(clock, limit=1, period=60, slices=12, max_keys=100)
    for number in range(1000):
        window.add(f"10.0.{number // 256}.{number % 256}")
    assert len(window) == 100


def test_what_was_not_sent_is_given_back() -> None:
    clock = Clock()
    limits = RateLimits(clock, RateLimitSettings(client_messages_per_minute=1,
                                                 account_recipients_per_day=2))
    client = ClientInfo("192.0.2.7", 1000, "smtps", "s1")
    quota = limits.quota(client, "scanner")
    assert quota.message() is None and quota.recipient() is None
    quota.recipient_refused()  # refused upstream: it does not count
    assert quota.recipient() is None and quota.recipient() is None
    assert quota.recipient().code == 450  # the third that counts
    quota.settle(sent=False)  # deferred: everything is given back
    again = limits.quota(client, "scanner")
    assert again.message() is None
    assert again.recipient() is None and again.recipient() is None
    again.settle(sent=True)
    third = limits.quota(client, "scanner")
    refusal = third.message()
    assert (refusal.code, refusal.enhanced) == (450, "4.7.1")
    other = limits.quota(ClientInfo("192.0.2.8", 1000, "smtps", "s2"), "scanner")
    assert other.message() is None
    assert other.recipient().code == 450  # the account's day is used up
    assert "address" not in other.recipient().text


def test_the_microsoft_365_example_carries_its_sending_limits(tmp_path: Any) -> None:
    with open(os.path.join(ROOT, "etc", "m365.toml"), encoding="utf-8") as f:
        text = f.read().replace("/etc/smtpbridge/", f"{tmp_path}/")
    (tmp_path / "m365-client-secret").write_text("not-a-real-secret\n")
    limits = parse_config(text, str(tmp_path / "m365.toml")).rate_limits
    assert (limits.account_messages_per_minute, limits.account_recipients_per_day) == (
        30, 10_000)


# Real clients.

Limited = Callable[..., RunningBridge]


@pytest.fixture
def limited(reactor: Any, relay_toml: Callable[..., str],
            tmp_path: Any) -> Iterator[Limited]:
    """Starts a bridge relaying to an upstream with the given [rate_limits]."""
    running: list[RunningBridge] = []

    def start(server: Upstream, **limits: int) -> RunningBridge:
        directory = tmp_path / f"bridge-{len(running)}"
        directory.mkdir()
        toml = relay_toml(server) + "\n[rate_limits]\n" + "".join(
            f"{key} = {value}\n" for key, value in limits.items())
        running.append(start_bridge(reactor, toml, str(directory)))
        return running[-1]

    yield start
    for bridge in running:
        stop_bridge(reactor, bridge)


def test_messages_per_minute_per_client(limited: Limited, upstream: Upstream,
                                        certificate: tuple[str, str],
                                        logged: list[str]) -> None:
    bridge = limited(upstream, client_messages_per_minute=2)
    with smtps(bridge, certificate) as client:
        for _ in range(2):
            assert client.sendmail(SENDER, [RECIPIENT], b"Subject: ok\r\n\r\nhi\r\n") == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(SENDER, [RECIPIENT], b"Subject: third\r\n\r\nhi\r\n")
    assert refused.value.smtp_code == 450
    assert refused.value.smtp_error.startswith(b"4.7.1 Too many messages from your address")
    assert len(upstream.stored()) == 2
    mails = [line for line in commands(upstream.under_tls()) if line.startswith(b"MAIL")]
    assert len(mails) == 2  # the third never reached the upstream
    assert any("rate limit: more than 2 messages a minute from [127.0.0.1]" in line
               for line in logged)
    assert any("status=deferred" in line and "450 4.7.1" in line for line in logged)


def test_recipients_per_day_per_account(limited: Limited, upstream_factory: Any,
                                        certificate: tuple[str, str]) -> None:
    server = upstream_factory(reject_recipients={"nobody@example.com": "550 5.1.1 No"})
    bridge = limited(server, account_recipients_per_day=3)
    with smtps(bridge, certificate) as client:
        refused = client.sendmail(SENDER, ["a@example.com", "nobody@example.com"],
                                  b"Subject: one\r\n\r\nhi\r\n")
        assert list(refused) == ["nobody@example.com"]  # refused upstream: not counted
        refused = client.sendmail(SENDER, ["b@example.com", "c@example.com",
                                           "d@example.com"], b"Subject: two\r\n\r\nhi\r\n")
    assert refused == {"d@example.com": (450, b"4.7.1 The sending account's limit of "
                                              b"recipients a day is reached; try again later")}
    assert [message.recipients for message in server.stored()] == [
        ["a@example.com"], ["b@example.com", "c@example.com"]]


def test_a_deferred_message_does_not_use_the_quota(limited: Limited, upstream_factory: Any,
                                                   certificate: tuple[str, str]) -> None:
    server = upstream_factory(data_reply="451 4.3.0 Busy")
    bridge = limited(server, account_messages_per_minute=1)
    with smtps(bridge, certificate) as client:
        for _ in range(3):
            with pytest.raises(smtplib.SMTPDataError) as deferred:
                client.sendmail(SENDER, [RECIPIENT], b"Subject: later\r\n\r\nhi\r\n")
            assert deferred.value.smtp_code == 451  # the upstream's, not the limit's
