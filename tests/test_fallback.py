"""Spool mode "fallback" (and "always") in memory: the in-line verdict while the upstream
gives one, the spool when it cannot.  The upstream is L{FakeUpstream}; the spool is real,
in a temporary directory; its runner's clock stands still, so nothing is retried here."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock

from smtpbridge.mapping import StaticMapper
from smtpbridge.model import Assignment, ClientInfo, Reply, Route, UpstreamAccount
from smtpbridge.queuerunner import QueueRunner, RetrySettings
from smtpbridge.relay import InlineTransaction
from smtpbridge.secret import Secret
from smtpbridge.spool import Spool
from smtpbridge.testing import QUEUED, FakeUpstream, unreachable
from tests.test_upstream_contract import Producer

ROUTE = Route("smtp.example.com", 587)
ACCOUNT = UpstreamAccount("relay@example.com", Secret("pw"), name="office")
CLIENT = ClientInfo("192.0.2.7", 40000, "legacy", "s9", helo="printer")
SENDER, ONE, TWO = "scanner@example.com", "one@example.com", "two@example.com"
BODY = [b"Subject: scan", b"", b"page 1", b".", b"page 2"]
ON_DISK = b"".join(line + b"\r\n" for line in BODY)


def outcome(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


class Bridge:
    """A transaction factory over a fake upstream and a real spool."""

    def __init__(self, tmp_path: Any, max_size: int = 10 * 1024 * 1024,
                 account: UpstreamAccount = ACCOUNT, commit_fails: int = 0) -> None:
        self.upstream = FakeUpstream()
        self.spool = Spool(str(tmp_path / "spool"), max_size)
        self.spool.prepare()
        clock = Clock()

        def run_blocking(f: Any, *args: Any) -> Deferred[Any]:
            if commit_fails:
                return fail(OSError(commit_fails, os.strerror(commit_fails)))
            return maybeDeferred(f, *args)

        self.runner = QueueRunner(self.spool, self.upstream,
                                  {ACCOUNT.name: Assignment((ROUTE,), ACCOUNT)}, clock,
                                  RetrySettings(), "bridge.example.net", run_blocking)
        self.account = account

    def transaction(self, always: bool = False) -> InlineTransaction:
        mapper = StaticMapper(Assignment((ROUTE,), self.account))
        return InlineTransaction(mapper, self.upstream, CLIENT, self.runner, always)

    def spooled(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        result = []
        for envelope in self.spool.envelopes():
            with self.spool.data(envelope.id) as f:
                result.append((envelope.sender, envelope.recipients, f.read()))
        return result


def send(t: InlineTransaction, recipients: tuple[str, ...] = (ONE,),
         body: list[bytes] = BODY) -> list[Reply]:
    """The whole transaction; every reply the client hears."""
    replies = [outcome(t.mail(SENDER, {}))]
    replies += [outcome(t.rcpt(r, {})) for r in recipients]
    replies.append(outcome(t.data(Producer())))
    t.write(body[:2])
    t.write(body[2:])
    replies.append(outcome(t.finish()))
    return replies


def queued(reply: Reply) -> bool:
    return reply.code == 250 and reply.text.startswith("Ok: queued as ")


def test_a_healthy_upstream_gives_its_own_verdict_and_the_spool_stays_empty(tmp_path):
    bridge = Bridge(tmp_path)
    replies = send(bridge.transaction())
    assert replies[-1] == QUEUED  # the upstream's reply, word for word
    assert len(bridge.upstream.messages) == 1 and bridge.spooled() == []
    assert os.listdir(os.path.join(bridge.spool.directory, "tmp")) == []


@pytest.mark.parametrize("reply", [Reply(554, "5.7.1", "Rejected as spam"),
                                   Reply(552, "5.3.4", "Too big")])
def test_a_5xx_at_the_dot_passes_through_and_nothing_is_kept(tmp_path, reply):
    bridge = Bridge(tmp_path)
    bridge.upstream.replies["end_data"] = reply
    assert send(bridge.transaction())[-1] == reply
    assert bridge.spooled() == []


def test_a_4xx_at_the_dot_is_spooled_and_acknowledged(tmp_path):
    bridge = Bridge(tmp_path)
    bridge.upstream.replies["end_data"] = Reply(451, "4.3.0", "Try again later")
    t = bridge.transaction()
    replies = send(t, (ONE, TWO))
    assert queued(replies[-1])
    assert t.outcome is not None and t.outcome.status == "spooled"
    assert t.outcome.why == Reply(451, "4.3.0", "Try again later")  # the summary says why
    assert bridge.spooled() == [(SENDER, (ONE, TWO), ON_DISK)]
    [envelope] = bridge.spool.envelopes()
    assert replies[-1].text.endswith(envelope.id) and envelope.account == "office"
    assert envelope.session == "s9" and envelope.client == "192.0.2.7"


def test_an_upstream_lost_mid_body_is_spooled(tmp_path):
    bridge = Bridge(tmp_path)
    t = bridge.transaction()
    t.mail(SENDER, {})
    t.rcpt(ONE, {})
    t.data(Producer())
    t.write(BODY[:2])
    bridge.upstream.sessions[0].fail("closed the connection during the message body")
    t.write(BODY[2:])
    assert queued(outcome(t.finish()))
    assert bridge.spooled() == [(SENDER, (ONE,), ON_DISK)]


def test_an_unreachable_upstream_sends_everything_to_the_spool(tmp_path):
    bridge = Bridge(tmp_path)
    bridge.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    replies = send(bridge.transaction(), (ONE, TWO))
    assert [r.code for r in replies] == [250, 250, 250, 354, 250]
    assert queued(replies[-1])
    assert bridge.upstream.sessions == []
    assert bridge.spooled() == [(SENDER, (ONE, TWO), ON_DISK)]


def test_a_4xx_to_mail_sends_the_message_to_the_spool(tmp_path):
    bridge = Bridge(tmp_path)
    bridge.upstream.replies["mail"] = Reply(421, "4.7.0", "Too many connections")
    replies = send(bridge.transaction())
    assert replies[0].code == 250 and queued(replies[-1])
    assert bridge.upstream.sessions[0].closed and bridge.upstream.messages == []
    assert bridge.spooled() == [(SENDER, (ONE,), ON_DISK)]


def test_a_recipient_deferred_in_line_is_spooled_alone(tmp_path):
    bridge = Bridge(tmp_path)
    bridge.upstream.replies[f"rcpt:{TWO}"] = Reply(452, "4.2.2", "Mailbox full")
    replies = send(bridge.transaction(), (ONE, TWO))
    assert [r.code for r in replies[:3]] == [250, 250, 250]  # TWO is accepted for later
    [message] = bridge.upstream.messages
    assert message.recipients == [ONE]
    assert bridge.spooled() == [(SENDER, (TWO,), ON_DISK)]
    final = replies[-1]
    assert final.code == 250 and final.text.startswith(QUEUED.text)
    assert "1 recipient(s) queued as " in final.text


def test_recipients_left_of_a_message_the_upstream_took_are_kept_past_max_size(tmp_path):
    """The upstream took the message for one recipient: a refusal of the other's copy
    would have the device send it to both again, so the budget gives way."""
    bridge = Bridge(tmp_path, max_size=100)  # room at MAIL; the message itself is bigger
    bridge.upstream.replies[f"rcpt:{TWO}"] = Reply(452, "4.2.2", "Mailbox full")
    final = send(bridge.transaction(), (ONE, TWO))[-1]
    assert final.code == 250 and "1 recipient(s) queued as " in final.text
    assert bridge.spooled() == [(SENDER, (TWO,), ON_DISK)] and bridge.spool.stored > 100
    # A whole message, which can be refused as a whole, is held to the budget.
    bridge.upstream.replies["end_data"] = Reply(451, "4.3.0", "Try again later")
    assert bridge.spool.full()
    assert send(bridge.transaction())[-1] == Reply(451, "4.3.0", "Try again later")
    assert len(bridge.spooled()) == 1


def test_a_recipient_refused_with_5xx_is_refused(tmp_path):
    bridge = Bridge(tmp_path)
    refusal = Reply(550, "5.1.1", "No such user")
    bridge.upstream.replies[f"rcpt:{TWO}"] = refusal
    replies = send(bridge.transaction(), (ONE, TWO))
    assert replies[2] == refusal
    assert bridge.upstream.messages[0].recipients == [ONE] and bridge.spooled() == []


def test_every_recipient_deferred_sends_the_whole_message_to_the_spool(tmp_path):
    bridge = Bridge(tmp_path)
    bridge.upstream.replies["rcpt"] = Reply(450, "4.2.1", "Later")
    replies = send(bridge.transaction(), (ONE, TWO))
    assert queued(replies[-1])
    assert "DATA" not in bridge.upstream.sessions[0].commands
    assert bridge.spooled() == [(SENDER, (ONE, TWO), ON_DISK)]


def test_a_client_gone_mid_body_leaves_nothing_anywhere(tmp_path):
    bridge = Bridge(tmp_path)
    t = bridge.transaction()
    t.mail(SENDER, {})
    t.rcpt(ONE, {})
    t.data(Producer())
    t.write(BODY[:3])
    t.abort()
    assert bridge.upstream.sessions[0].aborted and bridge.upstream.messages == []
    assert bridge.spooled() == [] and bridge.spool.writing == 0
    assert os.listdir(os.path.join(bridge.spool.directory, "tmp")) == []


def test_mode_always_spools_without_asking_the_upstream(tmp_path):
    bridge = Bridge(tmp_path)
    replies = send(bridge.transaction(always=True))
    assert queued(replies[-1]) and bridge.upstream.attempts == []
    assert bridge.spooled() == [(SENDER, (ONE,), ON_DISK)]


def test_a_full_spool_refuses_what_it_would_have_to_keep(tmp_path):
    bridge = Bridge(tmp_path, max_size=1024 * 1024)
    bridge.spool.stored = 1024 * 1024  # full
    bridge.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    reply = outcome(bridge.transaction().mail(SENDER, {}))
    assert (reply.code, reply.enhanced) == (452, "4.3.1")
    # In-line mail still flows while the upstream is there (nothing needs keeping).
    del bridge.upstream.connect_errors[ROUTE.host]
    assert send(bridge.transaction())[-1] == QUEUED


def test_a_clients_own_login_is_never_spooled(tmp_path):
    own = UpstreamAccount("alice@example.com", Secret("theirs"), name="passthrough:alice")
    bridge = Bridge(tmp_path, account=own)
    bridge.upstream.replies["end_data"] = Reply(451, "4.3.0", "Try again later")
    assert send(bridge.transaction())[-1] == Reply(451, "4.3.0", "Try again later")
    assert bridge.spooled() == []


@pytest.mark.parametrize(("error", "answer"), [(errno.ENOSPC, (452, "4.3.1")),
                                               (errno.EIO, (451, "4.3.0"))])
def test_a_spool_that_cannot_write_says_so(tmp_path, logged, error, answer):
    bridge = Bridge(tmp_path, commit_fails=error)
    bridge.upstream.replies["end_data"] = Reply(451, "4.3.0", "Try again later")
    reply = send(bridge.transaction())[-1]
    assert (reply.code, reply.enhanced) == answer  # a full disk: insufficient storage
    assert bridge.spooled() == []
    assert f"s9 the message could not be spooled: [Errno {error}] {os.strerror(error)} " \
        "(the upstream: 451 4.3.0 Try again later)" in logged


def test_a_message_that_would_overrun_max_size_is_not_kept(tmp_path):
    """The budget is checked at MAIL (with what is being written) and again when the
    message is kept: one that began while there was room, but no longer fits, is not."""
    bridge = Bridge(tmp_path, max_size=1024)
    bridge.upstream.replies["end_data"] = Reply(451, "4.3.0", "Try again later")
    t = bridge.transaction()
    replies = send(t, body=[b"Subject: big", b""] + [b"x" * 100] * 12)
    assert replies[0].code == 250  # room at MAIL
    assert (replies[-1].code, replies[-1].enhanced) == (452, "4.3.1")
    assert bridge.spooled() == [] and bridge.spool.stored == 0 == bridge.spool.writing
    assert queued(send(bridge.transaction())[-1])  # a small one still fits
    assert 0 < bridge.spool.stored <= 1024

