"""The spool on disk, bounces, and the queue runner with a fake upstream and a Clock."""

from __future__ import annotations

import email
import email.policy
import errno
import os
import stat
from typing import Any

import attr
import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from smtpbridge import dsn
from smtpbridge.bodypump import message_lines
from smtpbridge.model import Assignment, ClientInfo, Envelope, Reply, Route, UpstreamAccount
from smtpbridge.queuerunner import QueueRunner, RetrySettings
from smtpbridge.secret import Secret
from smtpbridge.spool import Spool
from smtpbridge.spooldirs import adopt, orphans, spool_directories, worker_directory
from smtpbridge.spoolfile import SpoolWriter
from smtpbridge.testing import FakeUpstream, unreachable
from tests.test_config import MINIMAL

ROUTE = Route("smtp.example.com", 587)
ACCOUNT = UpstreamAccount("relay@example.com", Secret("pw"), name="office")
REWRITING = UpstreamAccount("relay@example.com", Secret("pw"), name="office",
                            rewrite_sender="relay@example.com")
CLIENT = ClientInfo("192.0.2.7", 40000, "legacy", "s1")
BODY = [b"From: scanner@example.com", b"Subject: scan", b"", b".dot line", b"end"]


def result(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


@pytest.fixture
def spool(tmp_path: Any) -> Spool:
    spool = Spool(str(tmp_path / "spool"), 10 * 1024 * 1024)
    spool.prepare()
    return spool


# The files.

def test_a_committed_message_is_one_private_file(spool: Spool) -> None:
    writer = spool.writer(1_800_000_000)
    writer.write(BODY)
    assert spool.ids() == []  # nothing is queued before the commit
    envelope = Envelope(writer.id, "a@example.com", ("b@example.com",), "office",
                        1_800_000_000.0, writer.size)
    writer.commit(envelope)
    assert spool.ids() == [writer.id]
    assert spool.load(writer.id) == envelope
    with spool.data(writer.id) as f:
        assert f.read() == b"".join(line + b"\r\n" for line in BODY)
    assert queue_files(spool) == [f"{writer.id}.msg"]  # the envelope is in it
    assert stat.S_IMODE(os.stat(spool.path(writer.id)).st_mode) == 0o600
    for name in ("", "queue", "tmp"):
        assert stat.S_IMODE(os.stat(os.path.join(spool.directory, name)).st_mode) == 0o700
    assert spool.stored == os.path.getsize(spool.path(writer.id)) and spool.writing == 0
    # Its state, once it changes, is a file beside it that supersedes the envelope in it.
    later = attr.evolve(envelope, attempts=1, last_error="451 4.3.0 try later")
    assert spool.update(later)
    assert spool.load(writer.id) == later
    assert queue_files(spool) == [f"{writer.id}.json", f"{writer.id}.msg"]
    assert stat.S_IMODE(os.stat(spool.path(writer.id, "json")).st_mode) == 0o600
    assert spool.remove(writer.id) and queue_files(spool) == [] and spool.stored == 0
    assert not spool.update(later)  # gone: nothing written
    assert queue_files(spool) == [] and spool.load(writer.id) is None
    assert os.listdir(os.path.join(spool.directory, "tmp")) == []


def test_a_small_message_is_kept_with_two_fsyncs(spool: Spool, monkeypatch: Any) -> None:
    """Its file, then the queue directory: the envelope is in the file, not beside it."""
    synced: list[str] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(
        f"/proc/self/fd/{fd}")), fsync(fd))[1])
    writer = spool.writer()
    writer.write(BODY)
    writer.commit(Envelope(writer.id, "", ("b@example.com",), "office", 0.0, writer.size))
    assert synced == [os.path.join(spool.directory, "tmp", f"{writer.id}.msg"),
                      os.path.join(spool.directory, "queue")]
    synced.clear()  # a new state is durable before the next attempt relies on it
    assert spool.update(Envelope(writer.id, "", ("b@example.com",), "office", 0.0,
                                 writer.size, attempts=1))
    assert synced == [os.path.join(spool.directory, "tmp", f"{writer.id}.json"),
                      os.path.join(spool.directory, "queue")]


def test_a_discarded_message_leaves_nothing(spool: Spool) -> None:
    writer = spool.writer()
    writer.write(BODY)
    assert spool.writing == writer.size
    writer.discard()
    assert spool.ids() == [] and spool.writing == 0
    assert os.listdir(os.path.join(spool.directory, "tmp")) == []


def tmp_files(spool: Spool) -> list[str]:
    return os.listdir(os.path.join(spool.directory, "tmp"))


def queue_files(spool: Spool) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.directory, "queue")))


def test_a_small_message_touches_the_disk_only_when_it_is_kept(spool: Spool) -> None:
    dropped, kept = spool.writer(), spool.writer()
    for writer in (dropped, kept):
        writer.write(BODY)
        writer.write([b"x" * 1000] * 30)
    assert tmp_files(spool) == []
    dropped.discard()
    kept.commit(Envelope(kept.id, "", ("b@example.com",), "office", 0.0, kept.size))
    assert spool.ids() == [kept.id] and tmp_files(spool) == []
    with spool.data(kept.id) as f:
        assert f.read() == b"".join(line + b"\r\n" for line in BODY + [b"x" * 1000] * 30)


def test_a_large_message_goes_to_a_file_as_it_arrives(spool: Spool) -> None:
    writer = spool.writer()
    lines = [b"%06d" % n + b"y" * 994 for n in range(200)]
    for n in range(0, 200, 7):
        writer.write(lines[n:n + 7])
        on_disk = os.path.getsize(os.path.join(spool.directory, "tmp", f"{writer.id}.msg")) \
            if tmp_files(spool) else 0
        assert writer.size - on_disk <= SpoolWriter.MEMORY  # the rest is in the file
    assert tmp_files(spool) == [f"{writer.id}.msg"]
    envelope = Envelope(writer.id, "", ("b@example.com",), "office", 0.0, writer.size)
    writer.commit(envelope)
    with spool.data(writer.id) as f:
        assert f.read() == b"".join(line + b"\r\n" for line in lines)
    assert tmp_files(spool) == []
    # Its envelope was not known when its file began: it is the file beside it.
    assert queue_files(spool) == [f"{writer.id}.json", f"{writer.id}.msg"]
    assert spool.load(writer.id) == envelope
    assert spool.stored == os.path.getsize(spool.path(writer.id))


def test_a_failed_write_is_raised_by_the_commit(spool: Spool) -> None:
    os.rmdir(os.path.join(spool.directory, "tmp"))  # no file can be made now
    writer = spool.writer()
    writer.write([b"z" * 1000] * 40)  # past MEMORY: the write fails, and says nothing yet
    writer.write([b"more"])
    with pytest.raises(FileNotFoundError):
        writer.commit(Envelope(writer.id, "", ("b@example.com",), "office", 0.0,
                               writer.size))
    assert spool.ids() == [] and spool.writing == 0 and spool.stored == 0


def test_what_a_crash_leaves_is_cleared_at_start(spool: Spool) -> None:
    kept = spool.writer()
    kept.write([b"kept"])
    kept.commit(Envelope(kept.id, "", ("b@example.com",), "office", 0.0, kept.size))
    half = spool.writer()
    half.write([b"half written"] * SpoolWriter.MEMORY)  # a crash: never committed
    assert len(os.listdir(os.path.join(spool.directory, "tmp"))) == 1
    large = spool.writer()  # a large message linked into queue/, its envelope not
    large.write([b"y" * 1000] * 40)
    large.commit(Envelope(large.id, "", ("b@example.com",), "office", 0.0, large.size))
    os.unlink(spool.path(large.id, "json"))
    with open(spool.path("0000000000000000", "json"), "wb") as f:  # a removal cut short
        f.write(kept.id.encode())
    with open(spool.path("0000000000000001"), "wb") as f:  # no spool file: left alone
        f.write(b"From: someone\r\n")
    again = Spool(spool.directory, spool.max_size)
    again.prepare()
    assert queue_files(again) == ["0000000000000001.msg", f"{kept.id}.msg"]
    assert os.listdir(os.path.join(spool.directory, "tmp")) == []
    with pytest.raises(ValueError, match="not a spool file"):
        again.load("0000000000000001")
    unreadable: list[str] = []
    assert [e.id for e in again.envelopes(unreadable)] == [kept.id]
    assert len(unreadable) == 1 and unreadable[0].startswith("0000000000000001: ")
    assert again.stored == sum(os.path.getsize(again.path(i)) for i in again.ids())


def test_a_message_of_the_first_format_that_cannot_be_moved_on_stays(spool: Spool) -> None:
    queue = os.path.join(spool.directory, "queue")
    os.mkdir(os.path.join(queue, "0000000000000001.eml"))  # (here: cannot be read)
    envelope = Envelope("0000000000000001", "a@example.com", ("b@example.com",), "office",
                        0.0, 10)
    with open(os.path.join(queue, "0000000000000001.json"), "w") as f:
        f.write(envelope.to_json())
    spool.hold("0000000000000001")
    kept = spool.writer()
    kept.write(BODY)
    kept.commit(Envelope(kept.id, "", ("b@example.com",), "office", 0.0, kept.size))
    again = Spool(spool.directory, spool.max_size)
    problems = again.prepare()  # the start goes on, and says what it could not do
    assert len(problems) == 1 and problems[0].startswith("message 0000000000000001 ")
    assert queue_files(again) == ["0000000000000001.eml", "0000000000000001.json",
                                  f"{kept.id}.msg"]
    assert again.ids() == [kept.id] and again.held("0000000000000001")
    assert tmp_files(again) == []


def test_messages_of_the_first_format_are_kept_and_delivered(spool: Spool) -> None:
    """A spool written before the envelope went into the message's file: data in
    ``<id>.eml``, envelope in ``<id>.json``."""
    queue = os.path.join(spool.directory, "queue")
    data = b"".join(line + b"\r\n" for line in BODY)
    old = Envelope("0000000000000001", "a@example.com", ("b@example.com",), "office", 0.0,
                   len(data), attempts=3)
    for message_id in ("0000000000000001", "0000000000000002"):
        with open(os.path.join(queue, f"{message_id}.eml"), "wb") as f:
            f.write(data)
    with open(os.path.join(queue, "0000000000000001.json"), "w") as f:
        f.write(old.to_json())  # 2 has none: its commit did not finish
    again = Spool(spool.directory, spool.max_size)
    again.prepare()
    assert queue_files(again) == ["0000000000000001.json", "0000000000000001.msg"]
    assert again.ids() == ["0000000000000001"] and again.load("0000000000000001") == old
    with again.data("0000000000000001") as f:
        assert f.read() == data
    assert stat.S_IMODE(os.stat(again.path("0000000000000001")).st_mode) == 0o600
    assert again.stored == os.path.getsize(again.path("0000000000000001"))


def test_the_size_budget(tmp_path: Any) -> None:
    spool = Spool(str(tmp_path / "spool"), 1000)
    spool.prepare()
    writer = spool.writer()
    writer.write([b"x" * 600])
    assert not spool.full() and spool.full(more=400)
    writer.write([b"x" * 400])
    assert spool.full()
    writer.discard()
    assert not spool.full()
    # A commit that would go beyond max_size fails, and leaves nothing.
    big = spool.writer()
    big.write([b"y" * 900])
    with pytest.raises(OSError) as raised:
        big.commit(Envelope(big.id, "", ("b@example.com",), "office", 0.0, big.size))
    assert raised.value.errno == errno.ENOSPC
    assert spool.stored == spool.writing == 0 and spool.ids() == [] and tmp_files(spool) == []
    small = spool.writer()
    small.write([b"z" * 100])
    small.commit(Envelope(small.id, "", ("b@example.com",), "office", 0.0, small.size))
    assert spool.stored == os.path.getsize(spool.path(small.id)) and spool.writing == 0


def test_message_lines_survive_any_chunking() -> None:
    import io

    data = b"".join(line + b"\r\n" for line in [b"a" * 70000, b"", b"b", b"c" * 5])
    batches = list(message_lines(io.BytesIO(data), chunk=1000))
    assert [line for batch in batches for line in batch] == [b"a" * 70000, b"", b"b",
                                                             b"c" * 5]


def test_locked_messages_and_markers(spool: Spool) -> None:
    writer = spool.writer()
    writer.write([b"x"])
    writer.commit(Envelope(writer.id, "", ("b@example.com",), "office", 0.0, 3))
    with spool.locked(writer.id) as first:
        assert first is not None
        with spool.locked(writer.id) as second:
            assert second is None  # another holder (the queue command) must wait
    spool.hold(writer.id)
    assert spool.held(writer.id)
    spool.hold(writer.id, on=False)
    assert not spool.held(writer.id)
    spool.request_flush(writer.id)
    assert spool.take_flush_requests() == {writer.id}
    assert spool.take_flush_requests() == set()
    assert spool.remove(writer.id) and spool.ids() == [] and spool.stored == 0


# Bounces.

def test_a_bounce_is_a_delivery_status_notification() -> None:
    lines = dsn.bounce(
        reporting_host="bridge.example.net", from_address="relay@example.com",
        to_address="scanner@example.com", queue_id="ABC", arrival=1_800_000_000,
        now=1_800_003_600, failures=[dsn.Failure("office@example.com", "5.1.1",
                                                 "550 5.1.1 No such user")],
        original_headers=[b"Subject: scan", b"From: scanner@example.com"],
        reason="the upstream refused it")
    message = email.message_from_bytes(b"\r\n".join(lines) + b"\r\n",
                                       policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["To"].addresses[0].addr_spec == "scanner@example.com"
    assert message["Auto-Submitted"] == "auto-replied"
    text, status, headers = message.get_payload()
    assert "office@example.com" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    fields = str(status)
    assert "Reporting-MTA: dns; bridge.example.net" in fields
    assert "Final-Recipient: rfc822; office@example.com" in fields
    assert "Action: failed" in fields and "Status: 5.1.1" in fields
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in fields
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: scan" in str(headers)


# The runner.

class Runner:
    """A queue runner on a Clock with a fake upstream; blocking calls run at once."""

    def __init__(self, spool: Spool, account: UpstreamAccount = ACCOUNT,
                 routes: tuple[Route, ...] = (ROUTE,), adopt: tuple[str, ...] = (),
                 more: tuple[Assignment, ...] = (), **settings: float) -> None:
        """C{account} over C{routes}, and the accounts of C{more} besides."""
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.upstream = FakeUpstream()
        self.spool = spool
        accounts = {a.account.name: a for a in (Assignment(routes, account), *more)}
        self.runner = QueueRunner(spool, self.upstream, accounts,
                                  self.clock, RetrySettings(**settings), "bridge.example.net",
                                  lambda f, *args: maybeDeferred(f, *args), adopt=adopt)
        self.account = account

    def keep(self, sender: str = "scanner@example.com",
             recipients: tuple[str, ...] = ("office@example.com",)) -> str:
        writer = self.runner.writer()
        writer.write(BODY)
        queue_id: str = result(self.runner.keep(writer, sender, recipients, self.account, {},
                                                CLIENT, tried=False))
        return queue_id

    def run(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        for _ in range(50):  # the body pump's steps
            self.clock.advance(0)


def test_the_first_try_waits_when_the_upstream_was_just_tried(spool: Spool) -> None:
    t = Runner(spool, first_retry=300)
    writer = t.runner.writer()
    writer.write(BODY)
    queue_id = result(t.runner.keep(writer, "a@example.com", ["b@example.com"], ACCOUNT, {},
                                    CLIENT))
    t.run(299)
    assert t.upstream.attempts == [] and spool.ids() == [queue_id]
    t.run(1)
    assert len(t.upstream.messages) == 1 and spool.ids() == []


def test_a_kept_message_is_delivered_and_removed(spool: Spool) -> None:
    t = Runner(spool)
    queue_id = t.keep()
    assert spool.ids() == [queue_id]
    t.run()
    [message] = t.upstream.messages
    assert message.sender == "scanner@example.com"
    assert message.recipients == ["office@example.com"]
    assert message.body == b"".join(line + b"\r\n" for line in BODY)
    assert spool.ids() == [] and spool.stored == 0


def test_a_temporary_failure_is_retried_on_a_doubling_schedule(spool: Spool) -> None:
    t = Runner(spool, first_retry=300, max_retry=1000)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    queue_id = t.keep()
    t.run()
    envelope = spool.load(queue_id)
    assert envelope is not None and envelope.attempts == 1
    assert "unreachable" in envelope.last_error
    assert envelope.next_attempt == t.clock.seconds() + 300
    t.run(300)
    assert spool.load(queue_id).attempts == 2  # type: ignore[union-attr]
    t.run(599)
    assert spool.load(queue_id).attempts == 2  # type: ignore[union-attr]
    t.run(1)
    assert spool.load(queue_id).attempts == 3  # type: ignore[union-attr]
    assert spool.load(queue_id).next_attempt == t.clock.seconds() + 1000  # type: ignore
    del t.upstream.connect_errors[ROUTE.host]
    t.run(1000)
    assert len(t.upstream.messages) == 1 and spool.ids() == []


def test_a_bounce_is_kept_past_max_size(spool: Spool) -> None:
    """A full spool still takes the bounce that lets a refused message leave it."""
    t = Runner(spool)
    t.upstream.replies["rcpt:gone@example.com"] = Reply(550, "5.1.1", "No such user")
    refused = t.keep(recipients=("gone@example.com",))
    spool.max_size = spool.stored  # full
    t.run()
    t.run()
    assert [m.recipients for m in t.upstream.messages] == [["scanner@example.com"]]
    assert refused not in spool.ids() and spool.ids() == [] and spool.stored == 0


def test_a_refusal_bounces_to_the_sender_through_the_same_account(spool: Spool) -> None:
    t = Runner(spool, REWRITING)
    t.upstream.replies["rcpt:gone@example.com"] = Reply(550, "5.1.1", "No such user")
    t.keep(recipients=("office@example.com", "gone@example.com"))
    t.run()
    t.run()
    delivered, bounce = t.upstream.messages
    assert delivered.recipients == ["office@example.com"]
    assert bounce.sender == "relay@example.com"  # the account's own address
    assert bounce.recipients == ["scanner@example.com"]
    assert b"multipart/report" in bounce.body and b"gone@example.com" in bounce.body
    assert b"Status: 5.1.1" in bounce.body
    parsed = email.message_from_bytes(bounce.body, policy=email.policy.default)
    headers = parsed.get_payload()[2]  # the original's header section, and nothing else
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_content().split() == ["From:", "scanner@example.com", "Subject:", "scan"]
    assert spool.ids() == []


def test_no_bounce_for_the_null_sender_or_a_bounce(spool: Spool) -> None:
    t = Runner(spool)
    t.upstream.replies["end_data"] = Reply(554, "5.7.1", "Rejected")
    t.keep(sender="")
    t.run()
    t.run()
    assert t.upstream.messages == [] and spool.ids() == []
    assert all(s.transmissions[0].sender == "" for s in t.upstream.sessions)


def test_max_age_bounces_and_removes(spool: Spool) -> None:
    t = Runner(spool, first_retry=3600, max_retry=3600, max_age=2 * 3600)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    queue_id = t.keep()
    t.run()
    t.run(3600)
    assert spool.load(queue_id) is not None
    t.run(3600)  # two hours old: no more tries
    assert spool.load(queue_id) is None
    del t.upstream.connect_errors[ROUTE.host]
    t.run(3600)  # the bounce waited like any message
    [bounce] = t.upstream.messages
    assert bounce.recipients == ["scanner@example.com"] and b"Status: 4.4.7" in bounce.body


def test_held_messages_wait_and_flush_retries_at_once(spool: Spool) -> None:
    t = Runner(spool, first_retry=3600, max_retry=3600)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    queue_id = t.keep()
    t.run()
    del t.upstream.connect_errors[ROUTE.host]
    spool.hold(queue_id)
    spool.request_flush(queue_id)
    t.runner.flush()
    t.run()
    assert t.upstream.messages == [] and spool.ids() == [queue_id]
    spool.hold(queue_id, on=False)
    spool.request_flush("all")
    t.runner.flush()
    t.run()
    assert len(t.upstream.messages) == 1 and spool.ids() == []


def test_a_message_of_an_unknown_account_waits(spool: Spool) -> None:
    t = Runner(spool)
    writer = spool.writer()
    writer.write(BODY)
    writer.commit(Envelope(writer.id, "a@example.com", ("b@example.com",), "removed",
                           t.clock.seconds(), writer.size))
    t.runner.startService()
    try:
        t.run()
        envelope = spool.load(writer.id)
        assert envelope is not None and envelope.attempts == 1
        assert envelope.last_error == "account removed is not configured"
    finally:
        t.runner.stopService()


def test_a_restarted_runner_picks_everything_up(spool: Spool) -> None:
    first = Runner(spool)
    first.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    ids = {first.keep(), first.keep()}
    first.run()
    second = Runner(spool)  # a new process over the same directory
    second.runner.startService()
    try:
        second.run(RetrySettings().max_retry)
        assert len(second.upstream.messages) == 2 and spool.ids() == []
        assert ids
    finally:
        second.runner.stopService()


def test_only_configured_accounts_are_spooled(spool: Spool) -> None:
    t = Runner(spool)
    assert t.runner.accepts(ACCOUNT)
    assert not t.runner.accepts(UpstreamAccount("alice@example.com", Secret("theirs"),
                                                name="passthrough:alice@example.com"))
    assert not t.runner.accepts(None)


# Workers: a spool each.

def kept_in(directory: str, count: int = 1) -> tuple[Spool, list[str]]:
    """A spool in C{directory} holding C{count} messages no runner delivers."""
    spool = Spool(directory, 10 * 1024 * 1024)
    spool.prepare()
    t = Runner(spool)
    t.upstream.connect_errors[ROUTE.host] = unreachable(ROUTE)
    return spool, [t.keep() for _ in range(count)]


def test_a_restarting_worker_leaves_the_other_workers_spools_alone(tmp_path: Any) -> None:
    base = str(tmp_path / "spool")
    first, [kept] = kept_in(worker_directory(base, 1))
    second = Spool(worker_directory(base, 2), 10 * 1024 * 1024)
    second.prepare()
    writing = second.writer()  # worker 2 is taking a message in
    writing.write(BODY)
    t = Runner(first, adopt=tuple(orphans(base, 1, 2)))  # worker 1 starts again
    t.runner.startService()
    try:
        assert first.ids() == [kept]
        writing.commit(Envelope(writing.id, "a@example.com", ("b@example.com",), "office",
                                0.0, writing.size))
        assert second.ids() == [writing.id]
    finally:
        t.runner.stopService()
    assert spool_directories(base) == [worker_directory(base, 1), worker_directory(base, 2)]


def test_what_no_process_owns_any_more_is_taken_over_at_start(tmp_path: Any) -> None:
    base = str(tmp_path / "spool")
    top, from_single = kept_in(base, 2)  # from a single process before
    top.hold(from_single[0])
    top.request_flush(from_single[1])
    _, from_third = kept_in(worker_directory(base, 3))  # from a third worker before
    _, from_second = kept_in(worker_directory(base, 2))
    assert orphans(base, 2, 2) == []  # only worker 1 takes over
    assert orphans(base, 1, 3) == [base]
    assert orphans(base, 1, 2) == [base, worker_directory(base, 3)]
    first = Spool(worker_directory(base, 1), 10 * 1024 * 1024)
    t = Runner(first, adopt=tuple(orphans(base, 1, 2)))
    t.runner.startService()
    try:
        assert first.ids() == sorted(from_single + from_third)
        assert first.held(from_single[0]) and not top.held(from_single[0])
        assert top.take_flush_requests() == set()
        assert first.take_flush_requests() == {from_single[1]}  # still to try at once
        assert first.stored == sum(os.path.getsize(first.path(i)) for i in first.ids())
        assert top.ids() == [] and os.listdir(os.path.join(base, "queue")) == []
        t.run(RetrySettings().max_retry)
        assert len(t.upstream.messages) == 2  # the held one waits
    finally:
        t.runner.stopService()
    # Back to a single process: it takes every worker's messages.
    assert orphans(base, None, 1) == [worker_directory(base, n) for n in (1, 2, 3)]
    single = Runner(top, adopt=tuple(orphans(base, None, 1)))
    single.runner.startService()
    try:
        assert top.ids() == sorted([from_single[0]] + from_second)
        assert top.held(from_single[0])
    finally:
        single.runner.stopService()


def test_a_message_whose_id_is_taken_stays_where_it_is(tmp_path: Any) -> None:
    base = str(tmp_path / "spool")
    top, [kept] = kept_in(base)
    first, [mine] = kept_in(worker_directory(base, 1))
    os.rename(top.path(kept), top.path(mine))  # the same id in both spools
    top.hold(mine)
    moved, problems = adopt(first, base)
    assert moved == 0 and len(problems) == 1 and mine in problems[0]
    assert top.ids() == [mine] == first.ids() and not first.held(mine)
    with first.data(mine) as a, top.data(mine) as b:
        assert a.read() == b.read()  # (the same body here; each kept its own)
    assert first.load(mine) is not None and top.load(mine) is not None


@pytest.mark.parametrize("cut", ["state linked", "message renamed"])
def test_a_take_over_cut_short_leaves_each_message_whole_once(tmp_path: Any, cut: str) -> None:
    base = str(tmp_path / "spool")
    top, [kept] = kept_in(base)
    tried = attr.evolve(top.load(kept), attempts=2, last_error="451 4.3.0 later")
    assert top.update(tried)  # its state beside it, moved before the message
    first = Spool(worker_directory(base, 1), 10 * 1024 * 1024)
    first.prepare()
    os.link(top.path(kept, "json"), first.path(kept, "json"))  # then a crash, or
    if cut == "message renamed":  # the message moved, then a crash
        os.rename(top.path(kept), first.path(kept))
    t = Runner(first, adopt=(base,))
    t.runner.startService()
    try:
        assert first.ids() == [kept] and top.ids() == []
        assert first.load(kept) == tried
        assert os.listdir(os.path.join(base, "queue")) == []
        with first.data(kept) as f:
            assert f.read().startswith(b"From: scanner@example.com\r\n")
    finally:
        t.runner.stopService()


def queue_command(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                  *args: str) -> tuple[int, str]:
    """``smtpbridge queue ARGS`` for a bridge of two workers whose spool is ``spool/`` in
    C{tmp_path}: its exit status and what it printed."""
    from smtpbridge.cli import main

    config = tmp_path / "smtpbridge.toml"
    config.write_text(f'[server]\nhostname = "h"\nworkers = 2\n[spool]\n'
                      f'directory = "{tmp_path / "spool"}"\n' + MINIMAL)
    code = main(["queue", "--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out + err


def test_the_queue_command_acts_on_every_workers_spool(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "spool"
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    first, [one] = kept_in(worker_directory(str(base), 1))
    second, [two, three] = kept_in(worker_directory(str(base), 2), 2)
    first.register(1001)  # the workers' processes, as their runners register them
    second.register(1002)
    signalled: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, number: signalled.append(pid))

    def queue(*args: str) -> tuple[int, str]:
        return queue_command(tmp_path, capsys, *args)

    code, listing = queue("list")
    assert code == 0 and "3 message(s)" in listing
    assert all(i in listing for i in (one, two, three))
    assert queue("hold", three) == (0, f"{three} held\n") and second.held(three)
    with second.locked(three):  # as the runner holds it while it delivers
        assert queue("hold", three) == (
            0, f"{three} held; the delivery attempt under way right now goes on\n")
    assert queue("delete", two)[0] == 0 and second.ids() == [three]
    # The running worker is told, so that it stops counting the message's space.
    assert second.take_flush_requests() == {two} and signalled == [1002]
    signalled.clear()
    assert queue("flush")[0] == 0
    assert first.take_flush_requests() == {"all"} == second.take_flush_requests()
    assert sorted(signalled) == [1001, 1002]
    signalled.clear()
    assert queue("flush", one)[0] == 0
    assert first.take_flush_requests() == {one} and second.take_flush_requests() == set()
    assert signalled == [1001]  # to worker 2, a signal alone would mean "flush all"
    assert queue("show", "0000000000000000")[0] == 1  # no such message
    envelope = first.load(one)
    os.unlink(first.path(one))  # delivered between reading its envelope and its data
    load = Spool.load
    monkeypatch.setattr(Spool, "load", lambda spool, message_id: envelope)
    code, said = queue("show", one)
    assert code == 1 and said.endswith(f"{one} left the queue just now\n")
    monkeypatch.setattr(Spool, "load", load)
    for action in ("show", "hold", "flush"):  # an id is never a path
        code, said = queue(action, "../../escaped")
        assert code == 2 and "not a queue id" in said
    assert sorted(os.listdir(tmp_path)) == ["smtpbridge.toml", "spool"]
    assert queue("show", three.lower())[0] == 0  # (as typed, in either case)
    with open(first.path("00000000DEADBEEF"), "wb") as f:  # no spool file
        f.write(b"garbage")
    code, said = queue("list")
    assert code == 0 and "00000000DEADBEEF: " in said and "not a spool file" in said
    with open(first.path("00000000DEADBEEF", "json"), "w") as f:  # its state is fine
        f.write(attr.evolve(envelope, id="00000000DEADBEEF").to_json())
    code, said = queue("show", "00000000DEADBEEF")
    assert code == 1 and said.endswith("cannot be read: " + first.path("00000000DEADBEEF")
                                       + ": not a spool file\n")
    assert queue("delete", "00000000deadbeef") == (0, "00000000DEADBEEF deleted\n")
    assert not os.path.exists(first.path("00000000DEADBEEF"))
    def denied(spool: Spool) -> list[str]:  # as for a user who may not read the spool
        raise PermissionError(13, "Permission denied", os.path.join(spool.directory, "queue"))
    monkeypatch.setattr(Spool, "ids", denied)
    code, said = queue("list")
    assert code == 1 and said.endswith("/queue: Permission denied\n")
    monkeypatch.undo()
    first.prepare()  # worker 1 starts again: the process ids it finds are gone
    assert first.runners() == [] and second.runners() == [1002]


def test_a_process_id_taken_by_another_process_gets_no_signal(spool: Spool) -> None:
    """After a crash, the runner's process id may be another process's by now: the
    queue command's SIGUSR1 (which ends a process that does not catch it) is not sent."""
    spool.register(os.getpid())
    assert spool.runners() == [os.getpid()]
    with open(os.path.join(spool.directory, "run", str(os.getpid())), "w") as f:
        f.write("1")  # another process, started at another time, registered this id
    assert spool.runners() == []


def test_the_queue_command_shows_no_terminal_controls() -> None:
    from smtpbridge.queuecli import printable

    assert printable("Subject: \x1b]0;owned\x07 hi\tthere\x9b") == \
        "Subject: \\x1b]0;owned\\x07 hi\tthere\\x9b"


def test_a_message_the_disk_cannot_hold_whole_is_not_kept(tmp_path: Any) -> None:
    """A write cut short (a full disk, a quota, here a file size limit) fails the
    commit: never a message kept truncated."""
    script = f"""
import resource, signal
from smtpbridge.model import Envelope
from smtpbridge.spool import Spool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
spool = Spool({str(tmp_path / "spool")!r}, 10**8)
spool.prepare()
resource.setrlimit(resource.RLIMIT_FSIZE,
                   (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
for lines in ([b"x" * 998] * 30, [b"y" * 998] * 10, [b"z" * 998] * 10):  # 30, 10, 10 KB
    w = spool.writer()
    for line in lines:
        w.write([line])
    try:
        w.commit(Envelope(w.id, "", ("b@example.com",), "office", 0.0, w.size))
        print("kept", w.size)
    except OSError as e:
        print("refused", e.errno)
for message_id in spool.ids():
    with spool.data(message_id) as f:
        print("queued", len(f.read()))
"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:5] == [
        f"refused {errno.EFBIG}", "kept 10000", "kept 10000", "queued 10000", "queued 10000"]


def test_a_commit_the_threads_refuse_leaves_no_reserved_bytes(spool: Spool) -> None:
    from twisted.internet.defer import fail

    busy = QueueRunner(spool, FakeUpstream(), {ACCOUNT.name: Assignment((ROUTE,), ACCOUNT)},
                       Clock(), RetrySettings(), "bridge.example.net",
                       lambda f, *args: fail(OSError(errno.EBUSY, "too many spool writes")))
    writer = busy.writer()
    writer.write([b"x" * 1000] * 40)  # past MEMORY: a file in tmp/ as well
    assert spool.writing == writer.size
    refused = result(busy.keep(writer, "a@example.com", ["b@example.com"], ACCOUNT, {},
                               CLIENT))
    assert refused.check(OSError)
    assert spool.writing == 0 and spool.ids() == [] and tmp_files(spool) == []


def test_a_message_never_replaces_another_of_the_same_id(spool: Spool) -> None:
    first = spool.writer()
    first.write([b"first"])
    envelope = Envelope(first.id, "a@example.com", ("b@example.com",), "office", 0.0,
                        first.size)
    first.commit(envelope)
    second = SpoolWriter(spool, first.id)  # the same random id, once in four billion
    second.write([b"second"])
    with pytest.raises(FileExistsError):
        second.commit(attr.evolve(envelope, recipients=("c@example.com",)))
    assert spool.ids() == [first.id] and spool.load(first.id) == envelope
    with spool.data(first.id) as f:
        assert f.read() == b"first\r\n"
    assert tmp_files(spool) == [] and spool.writing == 0
    assert spool.stored == os.path.getsize(spool.path(first.id))
    assert spool.sizes == {first.id: spool.stored}  # the first one's count stays


def test_a_writer_removes_only_files_it_made(spool: Spool) -> None:
    writing = spool.writer()
    writing.write([b"a" * 1000] * 40)  # past MEMORY: its file in tmp/
    clash = SpoolWriter(spool, writing.id)
    clash.write([b"b" * 1000] * 40)  # its file cannot be made: the same name
    clash.discard()
    writing.commit(Envelope(writing.id, "", ("b@example.com",), "office", 0.0,
                            writing.size))
    assert spool.ids() == [writing.id]
    with spool.data(writing.id) as f:
        assert f.read() == (b"a" * 1000 + b"\r\n") * 40


@pytest.mark.parametrize("failing", ["state", "message"])
def test_a_take_over_that_fails_leaves_nothing_behind(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    base = str(tmp_path / "spool")
    top, [kept] = kept_in(base)
    top.hold(kept)
    assert top.update(attr.evolve(top.load(kept), attempts=2))
    first = Spool(worker_directory(base, 1), 10 * 1024 * 1024)
    first.prepare()
    if failing == "state":
        os.mkdir(first.path(kept, "json"))  # its state cannot be moved there
    else:  # its state moved, the message cannot follow (another file system)
        def rename(source: str, target: str) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, "rename", rename)
    moved, problems = adopt(first, base)
    assert (moved, len(problems)) == (0, 1) and kept in problems[0]
    assert not first.held(kept) and top.held(kept) and top.load(kept) is not None
    assert first.ids() == [] and top.ids() == [kept]
    if failing == "message":
        assert queue_files(first) == []  # its state is not left there
