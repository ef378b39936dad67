"""Every IUpstreamConnector keeps the same contract: the real one against aiosmtpd on
loopback, and the shipped fake (L{smtpbridge.testing.FakeUpstream}) in memory; each of
them alone and behind the pool of kept sessions (L{smtpbridge.pool.SessionPool}).

Each test runs against both through a harness: C{call} runs a session's method (in
the reactor thread for the real one) and gives its result or raises its failure;
C{stored} is what the upstream accepted; C{lose_during} makes the upstream drop the
connection while a call waits for its reply.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpbridge.client import where
from smtpbridge.connector import UpstreamConnector
from smtpbridge.errors import UpstreamError
from smtpbridge.interfaces import IUpstreamConnector, IUpstreamSession
from smtpbridge.model import Reply, Route, UpstreamAccount
from smtpbridge.pool import SessionPool
from smtpbridge.secret import Secret
from smtpbridge.testing import FakeUpstream, FakeUpstreamSession
from smtpbridge.wire import parse_enhanced
from tests.upstream import Upstream, upstream_factory

FIXTURES = (upstream_factory,)  # pytest finds fixtures by module attribute

SENDER = "from@example.com"
RECIPIENT = "to@example.com"
#: Lines a careless client would get wrong: leading dots, a lone dot, 8-bit bytes.
BODY = [b"Subject: contract", b"", b".leading dot", b".", b"..", b"8-bit: \xc3\xa9\xff", b""]
STORED = b"".join(line + b"\r\n" for line in BODY)

#: (sender, recipients, body) of a message the upstream accepted.
Message = tuple[str, list[str], bytes]


@implementer(IPushProducer)
class Producer:
    """The client's side of a body, as the delivery hands it to the session."""

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


def parse_reply(text: str) -> Reply:
    """"550 5.1.1 No such user" as a Reply."""
    code, _, rest = text.partition(" ")
    enhanced, rest = parse_enhanced(rest)
    return Reply(int(code), enhanced, rest.strip())


def outcome(deferred: Deferred[Any]) -> Any:
    """The result (or Failure) of a Deferred that has fired."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


class Harness(Protocol):
    connector: IUpstreamConnector
    route: Route
    account: UpstreamAccount

    def call(self, function: Callable[..., Any], *args: Any) -> Any: ...

    def stored(self) -> list[Message]: ...

    def lose_during(self, session: Any, step: str,
                    call: Callable[[], Deferred[Reply]]) -> Deferred[Reply]: ...


class RealHarness:
    """L{UpstreamConnector} against an aiosmtpd upstream (STARTTLS and AUTH required)."""

    def __init__(self, reactor: Any, upstream: Upstream) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.connector = UpstreamConnector(reactor, "bridge.test")
        self.route = upstream.route()
        self.account = upstream.account()

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        return blockingCallFromThread(self.reactor, function, *args)

    def stored(self) -> list[Message]:
        return [(m.sender, m.recipients, m.content) for m in self.upstream.stored()]

    def lose_during(self, session: Any, step: str,
                    call: Callable[[], Deferred[Reply]]) -> Deferred[Reply]:
        """The upstream's event loop is held while the call goes out, so it cannot be
        answered; then the upstream drops its connections (the server keeps running)."""
        controller = self.upstream.controller
        held, go_on = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            go_on.wait(10)
            controller.cancel_tasks(stop_loop=False)  # each connection's task closes it

        controller.loop.call_soon_threadsafe(hold)
        try:
            assert held.wait(10)
            [pending] = self.call(lambda: [call()])
            assert not self.call(lambda: pending.called or session.usable)
        finally:
            go_on.set()
        return pending


class FakeHarness:
    """L{FakeUpstream}, its replies scripted as the aiosmtpd upstream's options say."""

    def __init__(self, reject_recipients: dict[str, str] | None = None,
                 data_reply: str | None = None) -> None:
        self.connector = FakeUpstream()
        for address, text in (reject_recipients or {}).items():
            self.connector.replies[f"rcpt:{address}"] = parse_reply(text)
        if data_reply is not None:
            self.connector.replies["end_data"] = parse_reply(data_reply)
        self.route = Route("smtp.example.com", 587)
        self.account = UpstreamAccount("relay@example.com", Secret("upstream-pass"))

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        result = function(*args)
        if isinstance(result, Deferred):
            result = outcome(result)
            if isinstance(result, Failure):
                result.raiseException()
        return result

    def stored(self) -> list[Message]:
        return [(m.sender, m.recipients, m.body) for m in self.connector.messages]

    def lose_during(self, session: FakeUpstreamSession, step: str,
                    call: Callable[[], Deferred[Reply]]) -> Deferred[Reply]:
        """The session is scripted to lose its connection at C{step}, replies held so
        that the call is seen waiting first."""
        session.fail_at, session.hold_replies = step, True
        pending = call()
        assert not (pending.called or session.usable)
        session.release_all()
        return pending


class PooledFakeHarness(FakeHarness):
    """L{FakeHarness} behind the pool; a step is lost on the session the pool lent."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.fake = self.connector
        self.connector = SessionPool(self.fake, Clock())

    def stored(self) -> list[Message]:
        return [(m.sender, m.recipients, m.body) for m in self.fake.messages]

    def lose_during(self, session: Any, step: str,
                    call: Callable[[], Deferred[Reply]]) -> Deferred[Reply]:
        return super().lose_during(session._session, step, call)


@pytest.fixture(params=["real", "fake", "real-pooled", "fake-pooled"])
def make(request: pytest.FixtureRequest) -> Callable[..., Harness]:
    """Builds a harness; C{reject_recipients} and C{data_reply} as for C{start_upstream}."""
    if request.param == "fake":
        return FakeHarness
    if request.param == "fake-pooled":
        return PooledFakeHarness
    reactor = request.getfixturevalue("reactor")
    start = request.getfixturevalue("upstream_factory")
    if request.param == "real":
        return lambda **options: RealHarness(reactor, start(**options))

    def pooled(**options: Any) -> Harness:
        harness = RealHarness(reactor, start(**options))
        pool = SessionPool(harness.connector, reactor)
        harness.connector = pool
        request.addfinalizer(lambda: harness.call(pool.stop))
        return harness

    return pooled


@pytest.fixture
def harness(make: Callable[..., Harness]) -> Harness:
    return make()


@pytest.fixture
def session(harness: Harness) -> Iterator[Any]:
    """A session of the harness's connector; quit after the test."""
    opened = harness.call(harness.connector.connect, harness.route, harness.account)
    yield opened
    harness.call(opened.quit)


def lost(harness: Harness, text: str) -> Reply:
    """The reply of a session that failed: 451 4.4.2 naming the upstream."""
    return Reply(451, "4.4.2", f"Upstream {where(harness.route)} {text}")


def error_of(harness: Harness, function: Callable[..., Any], *args: Any) -> Reply:
    with pytest.raises(UpstreamError) as caught:
        harness.call(function, *args)
    return caught.value.reply


def send(harness: Harness, session: Any, lines: list[bytes], sender: str = SENDER,
         recipients: tuple[str, ...] = (RECIPIENT,)) -> Reply:
    """One whole transaction; the reply to the final dot."""
    assert harness.call(session.mail, sender, {}).code == 250
    for recipient in recipients:
        assert harness.call(session.rcpt, recipient, {}).code == 250
    assert harness.call(session.data, Producer()).code == 354
    harness.call(session.write_lines, lines)
    reply: Reply = harness.call(session.end_data)
    return reply


def test_provides_the_interfaces(harness: Harness, session: Any) -> None:
    assert verifyObject(IUpstreamConnector, harness.connector)
    assert verifyObject(IUpstreamSession, session)
    assert session.route == harness.route
    assert "SIZE" in session.features and "STARTTLS" not in session.features
    assert harness.call(lambda: session.usable)


def test_a_whole_transaction_stores_exactly_the_body(harness: Harness, session: Any) -> None:
    assert harness.call(session.mail, SENDER, {"SIZE": "200"}).code == 250
    assert harness.call(session.rcpt, RECIPIENT, {}).code == 250
    assert harness.call(session.data, Producer()).code == 354
    assert not harness.call(lambda: session.usable)  # in DATA
    harness.call(session.write_lines, BODY[:3])
    harness.call(session.write_lines, BODY[3:])
    assert harness.call(session.end_data).code == 250
    assert harness.call(lambda: session.usable)
    assert harness.stored() == [(SENDER, [RECIPIENT], STORED)]


def test_two_transactions_after_the_final_dot(harness: Harness, session: Any) -> None:
    assert send(harness, session, [b"first"]).code == 250
    assert send(harness, session, [b"second"], "other@example.com",
                ("a@example.com", "b@example.com")).code == 250
    assert harness.stored() == [(SENDER, [RECIPIENT], b"first\r\n"),
                                ("other@example.com", ["a@example.com", "b@example.com"],
                                 b"second\r\n")]


def test_reset_forgets_the_transaction_under_way(harness: Harness, session: Any) -> None:
    assert harness.call(session.mail, "dropped@example.com", {}).code == 250
    assert harness.call(session.rcpt, "dropped-to@example.com", {}).code == 250
    assert harness.call(session.reset).code == 250
    assert harness.call(lambda: session.usable)
    assert send(harness, session, [b"kept"]).code == 250
    assert harness.stored() == [(SENDER, [RECIPIENT], b"kept\r\n")]


def test_a_refused_recipient_passes_through(make: Callable[..., Harness]) -> None:
    harness = make(reject_recipients={"nobody@example.com": "550 5.1.1 No such user"})
    session = harness.call(harness.connector.connect, harness.route, harness.account)
    harness.call(session.mail, SENDER, {})
    assert harness.call(session.rcpt, "one@example.com", {}).code == 250
    assert harness.call(session.rcpt, "nobody@example.com", {}) == Reply(
        550, "5.1.1", "No such user")
    assert harness.call(session.rcpt, "two@example.com", {}).code == 250
    assert harness.call(session.data, Producer()).code == 354
    harness.call(session.write_lines, [b"hi"])
    assert harness.call(session.end_data).code == 250
    harness.call(session.quit)
    assert harness.stored() == [(SENDER, ["one@example.com", "two@example.com"], b"hi\r\n")]


def test_a_refusal_at_the_final_dot_passes_through(make: Callable[..., Harness]) -> None:
    harness = make(data_reply="451 4.3.0 try again later")
    session = harness.call(harness.connector.connect, harness.route, harness.account)
    assert send(harness, session, [b"hi"]) == Reply(451, "4.3.0", "try again later")
    assert harness.call(lambda: session.usable)
    harness.call(session.quit)
    assert harness.stored() == []


def test_commands_out_of_order_get_the_upstreams_refusal(harness: Harness,
                                                         session: Any) -> None:
    assert harness.call(session.rcpt, RECIPIENT, {}).code == 503
    assert harness.call(session.mail, SENDER, {}).code == 250
    assert harness.call(session.mail, SENDER, {}).code == 503  # nested
    assert harness.call(session.data, Producer()).code == 503  # no recipient yet
    assert harness.call(lambda: session.usable)
    harness.call(session.reset)
    assert send(harness, session, [b"after all"]).code == 250


def test_abort_mid_data_stores_nothing(harness: Harness, session: Any) -> None:
    harness.call(session.mail, SENDER, {})
    harness.call(session.rcpt, RECIPIENT, {})
    assert harness.call(session.data, Producer()).code == 354
    harness.call(session.write_lines, [b"Subject: half", b"", b"the first half"])
    harness.call(session.abort)
    assert not harness.call(lambda: session.usable)
    aborted = lost(harness, "session was aborted")
    assert error_of(harness, session.end_data) == aborted
    assert error_of(harness, session.mail, SENDER, {}) == aborted
    assert error_of(harness, session.rcpt, RECIPIENT, {}) == aborted
    assert error_of(harness, session.data, Producer()) == aborted
    harness.call(session.write_lines, [b"ignored"])  # no error: the session is gone
    harness.call(session.abort)  # twice is harmless
    assert harness.call(session.quit) is None
    # The upstream is fine for the next session, and has only its message.
    again = harness.call(harness.connector.connect, harness.route, harness.account)
    assert send(harness, again, [b"whole"]).code == 250
    harness.call(again.quit)
    assert harness.stored() == [(SENDER, [RECIPIENT], b"whole\r\n")]


def test_reset_after_abort_in_data_fails_with_the_error(harness: Harness,
                                                        session: Any) -> None:
    harness.call(session.mail, SENDER, {})
    harness.call(session.rcpt, RECIPIENT, {})
    harness.call(session.data, Producer())
    harness.call(session.abort)
    assert error_of(harness, session.reset) == lost(harness, "session was aborted")


def test_quit_never_fails_and_ends_the_session(harness: Harness, session: Any) -> None:
    harness.call(session.mail, SENDER, {})
    assert harness.call(session.quit) is None
    assert not harness.call(lambda: session.usable)
    assert harness.call(session.quit) is None
    assert error_of(harness, session.mail, SENDER, {}) == lost(harness, "session was closed")
    assert error_of(harness, session.reset) == lost(harness, "session was closed")
    assert harness.stored() == []


def test_body_calls_outside_data_are_refused(harness: Harness, session: Any) -> None:
    with pytest.raises(RuntimeError):
        harness.call(session.write_lines, [b"before MAIL"])
    harness.call(session.mail, SENDER, {})
    harness.call(session.rcpt, RECIPIENT, {})
    with pytest.raises(RuntimeError):
        harness.call(session.write_lines, [b"before DATA"])
    with pytest.raises(RuntimeError):
        harness.call(session.end_data)
    harness.call(session.data, Producer())
    with pytest.raises(RuntimeError):
        harness.call(session.reset)
    harness.call(session.write_lines, [b"the body"])
    assert harness.call(session.end_data).code == 250
    with pytest.raises(RuntimeError):
        harness.call(session.write_lines, [b"after the final dot"])
    # Nothing refused went upstream.
    assert harness.stored() == [(SENDER, [RECIPIENT], b"the body\r\n")]


@pytest.mark.parametrize("step", ["mail", "end_data"])
def test_a_lost_connection_fails_the_pending_call(harness: Harness, session: Any,
                                                  step: str) -> None:
    if step == "mail":
        call, name = (lambda: session.mail(SENDER, {})), "MAIL"
    else:
        harness.call(session.mail, SENDER, {})
        harness.call(session.rcpt, RECIPIENT, {})
        harness.call(session.data, Producer())
        harness.call(session.write_lines, [b"all of it"])
        call, name = session.end_data, "end of data"
    pending = harness.lose_during(session, step, call)
    error = error_of(harness, lambda: pending)
    assert error.transient
    assert error == lost(harness, f"closed the connection during {name}")
    assert not harness.call(lambda: session.usable)
    # Every later call fails at once with the same error; quit still does not.
    for later in (lambda: session.mail(SENDER, {}), lambda: session.rcpt(RECIPIENT, {}),
                  lambda: session.data(Producer()), session.end_data):
        assert error_of(harness, later) == error
    assert harness.call(session.quit) is None
    assert harness.stored() == []
