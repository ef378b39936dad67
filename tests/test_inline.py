"""InlineTransaction in memory: the upstream is L{smtpbridge.testing.FakeUpstream}.

The fake keeps the real session's rules (tests/test_upstream_contract.py holds both
to them), so these tests are about the relay's own decisions: what it sends upstream,
what it passes back to the client, and how it ends the upstream session.  Nothing
here waits on time: an upstream timeout reaches the relay as a lost session.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from smtpbridge.earlybody import LIMIT as EARLY_LIMIT
from smtpbridge.errors import LoginRejected, SMTPReplyError, UpstreamError
from smtpbridge.interfaces import ITransaction
from smtpbridge.mapping import StaticMapper
from smtpbridge.model import Assignment, ClientInfo, Reply, Route, UpstreamAccount
from smtpbridge.relay import GONE, InlineTransaction
from smtpbridge.secret import Secret
from smtpbridge.testing import (
    QUEUED,
    RECIPIENT_OK,
    SENDER_OK,
    START_DATA,
    FakeUpstream,
    FakeUpstreamSession,
    UpstreamMessage,
    login_rejected,
    unreachable,
)
from tests.test_upstream_contract import Producer

CLIENT = ClientInfo("192.0.2.7", 40000, "legacy", "s1", helo="printer", login="device")
ROUTE = Route("smtp.example.com", 587)
BACKUP = Route("backup.example.com", 2525)
ACCOUNT = UpstreamAccount("relay@example.com", Secret("upstream-pass"))
REWRITING = UpstreamAccount("relay@example.com", Secret("upstream-pass"),
                            rewrite_sender="relay@example.com")
SENDER = "printer@example.com"
RECIPIENT = "office@example.com"


def transaction(upstream: FakeUpstream, account: UpstreamAccount | None = ACCOUNT,
                routes: tuple[Route, ...] = (ROUTE,)) -> InlineTransaction:
    return InlineTransaction(StaticMapper(Assignment(routes, account)), upstream, CLIENT)


def outcome(deferred: Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def error_of(deferred: Deferred[Any]) -> Reply:
    failure = outcome(deferred)
    assert isinstance(failure, Failure), failure
    failure.trap(SMTPReplyError)
    reply: Reply = failure.value.reply
    return reply


def the_session(upstream: FakeUpstream) -> FakeUpstreamSession:
    [session] = upstream.sessions
    return session


def to_data(t: InlineTransaction, producer: Producer | None = None) -> None:
    """MAIL, RCPT and DATA, each accepted."""
    assert outcome(t.mail(SENDER, {})).positive
    assert outcome(t.rcpt(RECIPIENT, {})).positive
    assert outcome(t.data(producer or Producer())).code == 354


def lost(text: str) -> Reply:
    return Reply(451, "4.4.2", f"Upstream smtp.example.com:587 {text}")


# The whole way.

def test_a_transaction_is_relayed_as_it_comes() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream)
    assert verifyObject(ITransaction, t)
    assert outcome(t.mail(SENDER, {"SIZE": "42"})) == SENDER_OK
    assert upstream.attempts == [(ROUTE, ACCOUNT)]
    assert outcome(t.rcpt(RECIPIENT, {})) == RECIPIENT_OK
    assert outcome(t.data(Producer())) == START_DATA
    t.write([b"Subject: hi", b""])
    t.write([b".dot", b"."])
    assert outcome(t.finish()) == QUEUED
    session = the_session(upstream)
    assert session.commands == [f"MAIL FROM:<{SENDER}> SIZE=42", f"RCPT TO:<{RECIPIENT}>",
                                "DATA", ".", "QUIT"]
    assert session.closed and not session.aborted
    assert upstream.messages == [UpstreamMessage(SENDER, [RECIPIENT],
                                                 b"Subject: hi\r\n\r\n.dot\r\n.\r\n", QUEUED)]
    # The transaction is over: later steps get GONE, an abort now changes nothing.
    assert error_of(t.rcpt(RECIPIENT, {})) == GONE
    t.abort()
    assert not session.aborted and len(upstream.messages) == 1


class CountingProducer(Producer):
    """Whether the client is paused now."""

    paused = False

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False


def held_to_data(upstream: FakeUpstream, producer: Producer) -> tuple[InlineTransaction,
                                                                       FakeUpstreamSession]:
    """MAIL and RCPT accepted; DATA sent, the upstream's 354 not come yet."""
    upstream.hold_replies = True
    t = transaction(upstream)
    mail = t.mail(SENDER, {})
    session = the_session(upstream)
    session.release_all()
    assert outcome(mail) == SENDER_OK
    rcpt = t.rcpt(RECIPIENT, {})
    session.release()
    assert outcome(rcpt) == RECIPIENT_OK
    # The client hears the bridge's own 354 at once, and starts on the body.
    assert outcome(t.data(producer)) == START_DATA
    assert session.commands[-1] == "DATA" and session.producer is None
    return t, session


@pytest.mark.parametrize("end", ["finish", "abort"])
def test_the_producer_is_registered_on_354_and_dropped_at_the_end(end: str) -> None:
    upstream = FakeUpstream()
    producer = CountingProducer()
    t, session = held_to_data(upstream, producer)
    session.release()  # the upstream's 354
    registered = session.producer
    assert registered is not None  # the upstream's back-pressure reaches the client
    registered.pauseProducing()
    assert producer.paused
    registered.resumeProducing()
    assert not producer.paused
    t.write([b"body"])
    if end == "finish":
        done = t.finish()
        assert session.producer is None
        session.release_all()
        assert outcome(done) == QUEUED
    else:
        t.abort()
        assert session.producer is None


def test_lines_before_the_upstreams_354_follow_it_in_order() -> None:
    upstream = FakeUpstream()
    t, session = held_to_data(upstream, Producer())
    t.write([b"Subject: early", b""])
    t.write([b"first"])
    assert session.transmissions == []  # nothing before the upstream's 354
    session.release()
    t.write([b"second"])
    done = t.finish()
    assert not done.called
    session.release_all()
    assert outcome(done) == QUEUED
    assert upstream.messages == [UpstreamMessage(
        SENDER, [RECIPIENT], b"Subject: early\r\n\r\nfirst\r\nsecond\r\n", QUEUED)]


def test_the_final_dot_before_the_upstreams_354_waits_for_it() -> None:
    upstream = FakeUpstream()
    t, session = held_to_data(upstream, Producer())
    t.write([b"Subject: short", b"", b"x"])
    done = t.finish()
    assert not done.called and "." not in session.commands
    session.release_all()
    assert outcome(done) == QUEUED
    assert session.commands[-2:] == [".", "QUIT"]
    assert upstream.messages[0].body == b"Subject: short\r\n\r\nx\r\n"


@pytest.mark.parametrize("answer", [Reply(554, "5.7.1", "Not now, not ever"),
                                    Reply(451, "4.3.0", "Try later")])
def test_data_refused_after_the_bridges_354_is_the_final_dots_reply(answer: Reply) -> None:
    upstream = FakeUpstream()
    upstream.replies["data"] = answer
    t, session = held_to_data(upstream, Producer())
    t.write([b"Subject: refused", b""])
    session.release()  # the refusal
    t.write([b"the rest goes nowhere"])
    assert error_of(t.finish()) == answer  # (no spool here: a 4xx too)
    assert session.transmissions == [] and upstream.messages == []
    assert "." not in session.commands
    assert session.commands[-1] == "QUIT" and not session.aborted  # handed back whole
    assert t.outcome is not None and t.outcome.reply == answer


def test_a_session_lost_before_its_354_fails_the_final_dot() -> None:
    upstream = FakeUpstream()
    t, session = held_to_data(upstream, Producer())
    t.write([b"Subject: lost", b""])
    session.fail()
    t.write([b"more"])
    assert error_of(t.finish()) == lost("closed the connection during DATA")
    assert upstream.messages == []


def test_a_body_held_for_the_354_is_bounded() -> None:
    upstream = FakeUpstream()
    producer = CountingProducer()
    t, session = held_to_data(upstream, producer)
    line = b"x" * 998
    for _ in range(EARLY_LIMIT // 1000):
        t.write([line])
    assert not producer.paused
    t.write([line, line])
    assert producer.paused  # the client waits for the upstream's 354
    session.release()
    assert not producer.paused
    assert len(session.transmissions[0].body) == (EARLY_LIMIT // 1000 + 2) * 1000


def test_the_end_of_the_wait_for_354_keeps_the_upstreams_own_pause() -> None:
    producer = CountingProducer()
    t, session = held_to_data(FakeUpstream(), producer)
    for _ in range(EARLY_LIMIT // 1000 + 2):
        t.write([b"z" * 998])
    assert producer.paused
    write_lines = session.write_lines

    def filling(lines: Any) -> None:  # the held lines fill the upstream's buffer
        write_lines(lines)
        assert session.producer is not None
        session.producer.pauseProducing()

    session.write_lines = filling  # type: ignore[method-assign]
    session.release()  # the 354: the held lines go, and the upstream pauses the client
    assert producer.paused
    session.producer.resumeProducing()  # its buffer drained
    assert not producer.paused
    t.abort()


def test_abort_before_the_upstreams_354_delivers_nothing() -> None:
    upstream = FakeUpstream()
    producer = CountingProducer()
    t, session = held_to_data(upstream, producer)
    for _ in range(EARLY_LIMIT // 1000 + 2):
        t.write([b"y" * 998])
    assert producer.paused
    t.abort()
    assert not producer.paused  # (the session ends: nothing holds the client for it)
    assert session.aborted and "QUIT" not in session.commands
    session.release_all()
    t.write([b"too late"])
    assert error_of(t.finish()) == GONE
    assert "." not in session.commands and not session.usable and session.producer is None
    assert upstream.messages == []


# The client goes away.

def test_abort_mid_data_drops_the_upstream_without_the_final_dot() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream)
    to_data(t)
    t.write([b"Subject: half", b"", b"the first half"])
    t.abort()
    session = the_session(upstream)
    assert session.aborted and not session.usable
    assert "." not in session.commands and "QUIT" not in session.commands
    assert upstream.messages == []
    [partial] = session.transmissions
    assert partial.body == b"Subject: half\r\n\r\nthe first half\r\n" and partial.reply is None
    t.write([b"the second half"])  # the client's last lines go nowhere
    assert partial.body.endswith(b"the first half\r\n")
    assert error_of(t.finish()) == GONE
    assert error_of(t.rcpt(RECIPIENT, {})) == GONE
    t.abort()  # twice is harmless


def test_abort_before_data_quits_the_upstream() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream)
    assert outcome(t.mail(SENDER, {})).positive
    assert outcome(t.rcpt(RECIPIENT, {})).positive
    t.abort()
    session = the_session(upstream)
    assert session.commands[-1] == "QUIT" and session.closed and not session.aborted
    assert session.transmissions == []
    assert error_of(t.data(Producer())) == GONE


def test_abort_before_mail_connects_nowhere() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream)
    t.abort()
    assert error_of(t.rcpt(RECIPIENT, {})) == GONE
    assert upstream.attempts == []


def test_client_gone_while_connecting() -> None:
    upstream = FakeUpstream()
    upstream.hold_connects = True
    t = transaction(upstream)
    mail = t.mail(SENDER, {})
    assert not mail.called and upstream.sessions == []
    t.abort()
    upstream.release_connects()
    session = the_session(upstream)
    assert session.commands == ["QUIT"] and session.closed
    reply = error_of(mail)
    assert reply == GONE and reply.code == 451


# The upstream session fails.

def test_session_lost_mid_data_gives_the_upstreams_451_at_the_final_dot() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream)
    to_data(t)
    t.write([b"Subject: x", b""])
    session = the_session(upstream)
    session.fail()
    t.write([b"more of the body"])  # the session is gone: dropped, no error
    failure = outcome(t.finish())
    assert isinstance(failure, Failure) and failure.check(UpstreamError)
    assert failure.value.reply == lost("closed the connection during the message body")
    assert upstream.messages == []
    assert session.closed  # quit after the final dot, whatever the verdict


STEPS = [("mail", "MAIL"), ("rcpt", "RCPT"), ("data", "DATA"), ("end_data", "end of data")]


@pytest.mark.parametrize("step, name", STEPS)
def test_session_lost_at_a_step_gives_its_451(step: str, name: str) -> None:
    upstream = FakeUpstream()
    upstream.fail_at = step
    t = transaction(upstream)
    calls = {"mail": lambda: t.mail(SENDER, {}), "rcpt": lambda: t.rcpt(RECIPIENT, {}),
             "data": lambda: t.data(Producer()), "end_data": t.finish}
    for key, _ in STEPS:
        if key == "end_data":
            t.write([b"body"])
        reply = calls[key]()
        if key == step:
            break
        assert outcome(reply).positive
    assert error_of(reply) == lost(f"closed the connection during {name}")
    assert upstream.messages == []
    if step in ("rcpt", "data"):  # the next step fails at once, alike
        assert error_of(t.data(Producer()) if step == "rcpt" else t.finish()) == lost(
            f"closed the connection during {name}")


# The sender rewrite.

def test_sender_rewrite_changes_the_envelope_and_from() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream, REWRITING)
    assert outcome(t.mail(SENDER, {})).positive
    assert the_session(upstream).commands == ["MAIL FROM:<relay@example.com>"]
    t.rcpt(RECIPIENT, {})
    t.data(Producer())
    t.write([b"From: Printer <printer@example.com>"])
    t.write([b"Subject: scan", b"", b"From: not a header"])
    t.write([b"end"])
    assert outcome(t.finish()) == QUEUED
    [message] = upstream.messages
    assert message.sender == "relay@example.com"
    assert message.body == (b"From: Printer <relay@example.com>\r\n"
                            b"Reply-To: Printer <printer@example.com>\r\n"
                            b"Subject: scan\r\n\r\nFrom: not a header\r\nend\r\n")


def test_sender_rewrite_keeps_the_null_sender() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream, REWRITING)
    assert outcome(t.mail("", {})).positive
    t.rcpt(RECIPIENT, {})
    t.data(Producer())
    t.write([b"From: MAILER-DAEMON@printer.example", b"Subject: bounce", b"", b"body"])
    t.finish()
    [message] = upstream.messages
    assert the_session(upstream).commands[0] == "MAIL FROM:<>" and message.sender == ""
    assert message.body.startswith(b"From: relay@example.com\r\n"
                                   b"Reply-To: MAILER-DAEMON@printer.example\r\n")


def test_sender_rewrite_of_a_message_that_is_all_header() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream, REWRITING)
    to_data(t)
    t.write([b"From: a@b.example", b"Subject: x"])
    assert the_session(upstream).transmissions[0].body == b""  # the header is still held
    assert outcome(t.finish()) == QUEUED
    [message] = upstream.messages
    assert message.body == b"From: relay@example.com\r\nReply-To: a@b.example\r\nSubject: x\r\n"


def test_sender_rewrite_fails_closed_on_a_huge_header_section() -> None:
    """A From: beyond the rewriter's reach is never relayed as it is: 552 5.3.4."""
    upstream = FakeUpstream()
    t = transaction(upstream, REWRITING)
    to_data(t)
    t.write([b"X-Filler: " + b"x" * 990] * 300)  # 300 KiB of header, no end yet
    t.write([b"From: forged@bank.example", b"", b"body"])
    reply = error_of(t.finish())
    assert (reply.code, reply.enhanced) == (552, "5.3.4")
    session = the_session(upstream)
    assert session.aborted and "." not in session.commands and upstream.messages == []


def utf8_upstream() -> FakeUpstream:
    """An upstream that does not offer SMTPUTF8."""
    upstream = FakeUpstream()
    del upstream.features["SMTPUTF8"]
    return upstream


def test_smtputf8_is_passed_on_when_the_upstream_offers_it() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream)
    assert outcome(t.mail("jörg@example.de", {"SMTPUTF8": None})).positive
    assert outcome(t.rcpt("bü@example.de", {})).positive
    assert the_session(upstream).commands[0] == "MAIL FROM:<jörg@example.de> SMTPUTF8"


def test_a_non_ascii_sender_is_refused_when_the_upstream_lacks_smtputf8() -> None:
    upstream = utf8_upstream()
    t = transaction(upstream)
    reply = outcome(t.mail("jörg@example.de", {"SMTPUTF8": None}))
    assert (reply.code, reply.enhanced) == (553, "5.6.7")
    assert the_session(upstream).commands == []  # nothing downgraded silently


def test_ascii_only_transactions_pass_without_smtputf8_upstream() -> None:
    upstream = utf8_upstream()
    t = transaction(upstream)
    assert outcome(t.mail(SENDER, {"SMTPUTF8": None})).positive
    reply = outcome(t.rcpt("bü@example.de", {}))
    assert (reply.code, reply.enhanced) == (553, "5.6.7")
    assert outcome(t.rcpt(RECIPIENT, {})).positive
    assert outcome(t.data(Producer())).code == 354
    t.write([b"Subject: plain", b"", "body with ümlauts".encode()])  # 8-bit body: fine
    assert outcome(t.finish()) == QUEUED
    session = the_session(upstream)
    assert session.commands[:2] == [f"MAIL FROM:<{SENDER}> SMTPUTF8",
                                    f"RCPT TO:<{RECIPIENT}>"]
    assert len(upstream.messages) == 1


def test_a_non_ascii_header_is_refused_when_the_upstream_lacks_smtputf8() -> None:
    upstream = utf8_upstream()
    t = transaction(upstream)
    assert outcome(t.mail(SENDER, {"SMTPUTF8": None})).positive
    assert outcome(t.rcpt(RECIPIENT, {})).positive
    assert outcome(t.data(Producer())).code == 354
    t.write(["Subject: Grüße".encode(), b"", b"body"])
    reply = error_of(t.finish())
    assert (reply.code, reply.enhanced) == (553, "5.6.7")
    assert the_session(upstream).aborted and upstream.messages == []


def test_without_rewrite_sender_nothing_changes() -> None:
    upstream = FakeUpstream()
    t = transaction(upstream)
    to_data(t)
    t.write([b"From: Printer <printer@example.com>", b"", b"body"])
    t.finish()
    [message] = upstream.messages
    assert message.sender == SENDER
    assert message.body == b"From: Printer <printer@example.com>\r\n\r\nbody\r\n"


# The upstream's refusals pass through verbatim.

def test_mail_refused() -> None:
    refusal = Reply(550, "5.7.1", "Sender address rejected:\nnot owned by user")
    upstream = FakeUpstream()
    upstream.replies["mail"] = refusal
    t = transaction(upstream)
    assert outcome(t.mail(SENDER, {})) == refusal
    t.abort()
    assert the_session(upstream).closed and upstream.messages == []


def test_one_of_two_recipients_refused() -> None:
    refusal = Reply(550, "5.1.1", "No such user here")
    upstream = FakeUpstream()
    upstream.replies["rcpt:nobody@example.com"] = refusal
    t = transaction(upstream)
    t.mail(SENDER, {})
    assert outcome(t.rcpt("nobody@example.com", {})) == refusal
    assert outcome(t.rcpt(RECIPIENT, {})) == RECIPIENT_OK
    t.data(Producer())
    t.write([b"hi"])
    assert outcome(t.finish()) == QUEUED
    assert upstream.messages == [UpstreamMessage(SENDER, [RECIPIENT], b"hi\r\n", QUEUED)]


def test_data_refused() -> None:
    refusal = Reply(554, "5.5.1", "No valid recipients")
    upstream = FakeUpstream()
    upstream.replies["data"] = refusal
    t = transaction(upstream)
    t.mail(SENDER, {})
    t.rcpt(RECIPIENT, {})
    assert outcome(t.data(Producer())) == refusal
    session = the_session(upstream)
    assert session.producer is None
    t.write([b"a body the upstream did not ask for"])  # not passed on, and no error
    assert session.transmissions == []
    t.abort()
    assert session.closed


@pytest.mark.parametrize("refusal", [Reply(451, "4.7.1", "Greylisted, try again later"),
                                     Reply(550, "5.7.1", "Message refused:\nlooks like spam")])
def test_final_dot_refused(refusal: Reply) -> None:
    upstream = FakeUpstream()
    upstream.replies["end_data"] = refusal
    t = transaction(upstream)
    to_data(t)
    t.write([b"hi"])
    assert outcome(t.finish()) == refusal
    session = the_session(upstream)
    assert upstream.messages == [] and session.transmissions[0].reply == refusal
    assert session.closed


# Failover.

@pytest.mark.parametrize("error", [unreachable(ROUTE), login_rejected(ROUTE, ACCOUNT.username)])
def test_the_next_host_serves_when_the_first_fails(error: UpstreamError) -> None:
    upstream = FakeUpstream()
    upstream.connect_errors[ROUTE.host] = error
    t = transaction(upstream, routes=(ROUTE, BACKUP))
    to_data(t)
    t.write([b"hi"])
    assert outcome(t.finish()) == QUEUED
    assert upstream.attempts == [(ROUTE, ACCOUNT), (BACKUP, ACCOUNT)]
    assert the_session(upstream).route == BACKUP
    assert upstream.messages[0].body == b"hi\r\n"


@pytest.mark.parametrize("refusing", [ROUTE, BACKUP])
def test_a_refused_login_wins_over_an_unreachable_host(refusing: Route) -> None:
    upstream = FakeUpstream()
    for route in (ROUTE, BACKUP):
        upstream.connect_errors[route.host] = (
            login_rejected(route, ACCOUNT.username) if route == refusing else unreachable(route))
    t = transaction(upstream, routes=(ROUTE, BACKUP))
    failure = outcome(t.mail(SENDER, {}))
    assert isinstance(failure, Failure) and failure.check(LoginRejected)
    assert failure.value.reply == login_rejected(refusing, ACCOUNT.username).reply
    assert [route for route, _ in upstream.attempts] == [ROUTE, BACKUP]
    assert upstream.sessions == []


def test_every_host_unreachable_gives_the_last_ones_error() -> None:
    upstream = FakeUpstream()
    for route in (ROUTE, BACKUP):
        upstream.connect_errors[route.host] = unreachable(route)
    t = transaction(upstream, routes=(ROUTE, BACKUP))
    assert error_of(t.mail(SENDER, {})) == unreachable(BACKUP).reply
    assert error_of(t.rcpt(RECIPIENT, {})) == GONE


class DeliveringProducer(CountingProducer):
    """A client whose input, held while paused, comes at once when it is let go on: the
    rest of its message and the final dot, as a line receiver delivers what it had read."""

    def __init__(self) -> None:
        self.transaction: InlineTransaction | None = None
        self.finished: list[Deferred[Any]] = []

    def resumeProducing(self) -> None:  # noqa: N802
        super().resumeProducing()
        if self.transaction is not None and not self.finished:
            self.transaction.write([b"the end"])
            self.finished.append(self.transaction.finish())


@pytest.mark.parametrize("answer", [None, Reply(554, "5.7.1", "No"), "lost"])
def test_the_rest_of_the_message_at_once_when_the_upstream_answers_data(
        answer: Reply | str | None) -> None:
    upstream = FakeUpstream()
    if isinstance(answer, Reply):
        upstream.replies["data"] = answer
    producer = DeliveringProducer()
    t, session = held_to_data(upstream, producer)
    line = b"w" * 998
    for _ in range(EARLY_LIMIT // 1000 + 2):  # more than is held: the client is paused
        t.write([line])
    assert producer.paused
    producer.transaction = t
    if answer == "lost":
        session.fail()
    else:
        session.release()  # the 354, or the refusal
    [done] = producer.finished
    session.release_all()
    if answer is None:
        assert outcome(done) == QUEUED
        [message] = upstream.messages
        assert message.body.endswith(line + b"\r\nthe end\r\n")
    elif isinstance(answer, Reply):
        assert error_of(done) == answer
        assert upstream.messages == [] and session.commands[-1] == "QUIT"
    else:
        assert error_of(done) == lost("closed the connection during DATA")
        assert upstream.messages == []
    assert "." not in session.commands or answer is None
