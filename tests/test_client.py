"""The upstream SMTP client: its state machine in memory, then against aiosmtpd over loopback."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.client import UpstreamProtocol, parse_features
from smtpbridge.config import Secret
from smtpbridge.connector import connect, set_up
from smtpbridge.errors import SMTPReplyError
from smtpbridge.model import Reply, Route, UpstreamAccount
from smtpbridge.upstreamsession import UpstreamSession
from tests.upstream import Upstream, upstream, upstream_factory, write_ca_bundle

FIXTURES = (upstream, upstream_factory)  # pytest finds fixtures by module attribute

USER = "relay@example.com"
SECRET = "s3cret-Pass"
ACCOUNT = UpstreamAccount(USER, Secret(SECRET))
ROUTE = Route("smtp.example.com", 587, timeout=30.0)
TLS_OPTIONS = object()
EHLO_TLS = (b"250-smtp.example.com\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
            b"250-AUTH LOGIN PLAIN\r\n250 OK\r\n")


@implementer(IPushProducer)
class Producer:
    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


# In memory: the protocol over a StringTransport, time from a Clock.

class FakeTransport(StringTransport):
    """A transport that records STARTTLS."""

    tls_options: object = None

    def startTLS(self, options: object) -> None:  # noqa: N802
        self.tls_options = options


class Harness:
    """One protocol in memory, driven by the test as the upstream server."""

    def __init__(self, account: UpstreamAccount | None = ACCOUNT, route: Route = ROUTE) -> None:
        self.clock = Clock()
        self.transport = FakeTransport()
        self.protocol = UpstreamProtocol(route, self.clock)
        self.protocol.makeConnection(self.transport)
        self.result: list[Any] = []
        self.setup = set_up(self.protocol, account, "bridge.test", TLS_OPTIONS)
        self.setup.addBoth(self.result.append)

    def server(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def to_tls(self) -> None:
        """Greeting, EHLO offering STARTTLS, STARTTLS accepted: the handshake runs."""
        self.server(b"220 smtp.example.com ESMTP\r\n")
        assert self.sent() == b"EHLO bridge.test\r\n"
        self.server(b"250-smtp.example.com\r\n250 STARTTLS\r\n")
        assert self.sent() == b"STARTTLS\r\n"
        self.server(b"220 2.0.0 go ahead\r\n")
        assert self.transport.tls_options is TLS_OPTIONS
        assert self.sent() == b"EHLO bridge.test\r\n"

    def to_auth(self, ehlo: bytes = EHLO_TLS) -> None:
        self.to_tls()
        self.protocol.handshakeCompleted()
        self.server(ehlo)

    def session(self) -> UpstreamSession:
        self.to_auth()
        assert self.sent().startswith(b"AUTH PLAIN ")
        self.server(b"235 2.7.0 ok\r\n")
        [session] = self.result
        assert isinstance(session, UpstreamSession)
        return session

    def error(self) -> Reply:
        [failure] = self.result
        assert isinstance(failure, Failure), failure
        failure.trap(SMTPReplyError)
        return failure.value.reply


def outcome(deferred: Deferred) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def error_of(deferred: Deferred) -> Reply:
    failure = outcome(deferred)
    assert isinstance(failure, Failure), failure
    failure.trap(SMTPReplyError)
    return failure.value.reply


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log line written meanwhile."""
    lines: list[str] = []

    def observer(event: dict) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def test_multi_line_ehlo_features() -> None:
    ehlo = Reply(250, None, "smtp.example.com Hello\nsize 1000\nAUTH=LOGIN\nAUTH PLAIN XOAUTH2"
                            "\n8BITMIME\nSTARTTLS")
    assert parse_features(ehlo) == {"SIZE": "1000", "AUTH": "LOGIN PLAIN XOAUTH2",
                                    "8BITMIME": "", "STARTTLS": ""}
    harness = Harness()
    harness.to_auth(b"250-smtp.example.com Hello\r\n250-SIZE 1000\r\n250-AUTH=LOGIN\r\n"
                    b"250-AUTH PLAIN\r\n250 SMTPUTF8\r\n")
    harness.sent()
    harness.server(b"235 2.7.0 ok\r\n")
    [session] = harness.result
    assert session.features == {"SIZE": "1000", "AUTH": "LOGIN PLAIN", "SMTPUTF8": ""}


def test_plain_is_preferred_over_login() -> None:
    harness = Harness()
    harness.to_auth()
    plain = base64.b64encode(f"\0{USER}\0{SECRET}".encode()).decode()
    assert harness.sent() == f"AUTH PLAIN {plain}\r\n".encode()
    harness.server(b"235 2.7.0 Authentication successful\r\n")
    assert isinstance(harness.result[0], UpstreamSession)
    assert harness.result[0].usable


def test_login_flow() -> None:
    harness = Harness()
    harness.to_auth(b"250-smtp.example.com\r\n250 AUTH LOGIN CRAM-MD5\r\n")
    assert harness.sent() == b"AUTH LOGIN\r\n"
    harness.server(b"334 VXNlcm5hbWU6\r\n")
    assert harness.sent() == base64.b64encode(USER.encode()) + b"\r\n"
    harness.server(b"334 UGFzc3dvcmQ6\r\n")
    assert harness.sent() == base64.b64encode(SECRET.encode()) + b"\r\n"
    assert harness.result == []
    harness.server(b"235 2.7.0 ok\r\n")
    assert isinstance(harness.result[0], UpstreamSession)


def test_login_rejected_hides_the_password(logged: list[str]) -> None:
    harness = Harness()
    harness.to_auth(b"250-smtp.example.com\r\n250 AUTH LOGIN\r\n")
    harness.server(b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n")
    echoed = base64.b64encode(SECRET.encode())
    harness.server(b"535 5.7.8 bad credentials " + echoed + b" " + SECRET.encode() + b"\r\n")
    reply = harness.error()
    assert (reply.code, reply.enhanced) == (454, "4.7.0")
    assert reply.text.startswith(f"Upstream smtp.example.com:587 rejected the login of {USER}: "
                                 "535 5.7.8 bad credentials")
    assert SECRET not in reply.text and echoed.decode() not in reply.text
    assert not any(SECRET in line or echoed.decode() in line for line in logged)
    assert any("rejected the login" in line for line in logged)
    # Over TLS, the session ends with QUIT.
    assert harness.sent().endswith(b"QUIT\r\n") and harness.transport.disconnecting


def test_no_usable_auth_mechanism() -> None:
    harness = Harness()
    harness.to_auth(b"250-smtp.example.com\r\n250 AUTH CRAM-MD5 GSSAPI\r\n")
    reply = harness.error()
    assert (reply.code, reply.enhanced) == (454, "4.7.0")
    assert reply.text == ("Upstream smtp.example.com:587 offers no AUTH mechanism the bridge "
                          "can use (offered: CRAM-MD5 GSSAPI)")


def test_no_auth_without_account() -> None:
    harness = Harness(account=None)
    harness.to_auth(b"250 smtp.example.com\r\n")
    assert harness.sent() == b""
    assert isinstance(harness.result[0], UpstreamSession)


def _at_step(step: str) -> tuple[Harness, Deferred | None]:
    """A harness whose oldest pending command is C{step}, and the call waiting for it.

    During setup no call waits but the setup itself (C{Harness.result}).
    """
    harness = Harness()
    if step == "greeting":
        return harness, None
    harness.server(b"220 smtp.example.com ESMTP\r\n")
    if step == "EHLO":
        return harness, None
    harness.server(b"250-smtp.example.com\r\n250 STARTTLS\r\n")
    if step == "STARTTLS":
        return harness, None
    harness.server(b"220 go ahead\r\n")
    if step == "TLS handshake":
        return harness, None
    harness.protocol.handshakeCompleted()
    if step == "EHLO after TLS":
        return harness, None
    harness.server(EHLO_TLS)
    if step == "AUTH":
        return harness, None
    harness.server(b"235 2.7.0 ok\r\n")
    session = harness.result[0]
    calls: dict[str, Callable[[], Deferred]] = {
        "MAIL": lambda: session.mail("a@example.com", {}),
        "RCPT": lambda: session.rcpt("b@example.com", {}),
        "DATA": lambda: session.data(Producer()),
        "RSET": session.reset,
    }
    if step in calls:
        return harness, calls[step]()
    assert step == "end of data"
    data = session.data(Producer())
    harness.server(b"354 go\r\n")
    assert outcome(data).code == 354
    session.write_lines([b"hello"])
    return harness, session.end_data()


STEPS = ["greeting", "EHLO", "STARTTLS", "TLS handshake", "EHLO after TLS", "AUTH", "MAIL",
         "RCPT", "DATA", "end of data", "RSET"]


@pytest.mark.parametrize("step", STEPS)
def test_timeout_at_each_step(step: str) -> None:
    harness, waiting = _at_step(step)
    harness.clock.advance(29)
    assert not (harness.result if waiting is None else waiting.called)
    assert not harness.transport.disconnecting
    harness.clock.advance(1)
    reply = harness.error() if waiting is None else error_of(waiting)
    name = "EHLO" if step == "EHLO after TLS" else step
    assert reply == Reply(451, "4.4.2", f"Upstream smtp.example.com:587 timed out during {name}")
    assert harness.transport.disconnected  # aborted
    assert harness.clock.getDelayedCalls() == []


@pytest.mark.parametrize("step", STEPS)
def test_connection_lost_during_each_step(step: str) -> None:
    harness, waiting = _at_step(step)
    harness.protocol.connectionLost(Failure(net_error.ConnectionDone()))
    name = "EHLO" if step == "EHLO after TLS" else step
    expected = Reply(451, "4.4.2", f"Upstream smtp.example.com:587 closed the connection "
                                   f"during {name}")
    if step == "TLS handshake":  # a handshake cut short is a TLS failure
        expected = Reply(454, "4.7.5", "Upstream smtp.example.com:587 TLS failed: the "
                         "connection was closed during the handshake (no TLS version or "
                         "cipher in common?)")
    assert (harness.error() if waiting is None else error_of(waiting)) == expected
    assert harness.clock.getDelayedCalls() == []


def test_later_calls_fail_at_once_after_a_failure() -> None:
    harness, waiting = _at_step("RCPT")
    session = harness.result[0]
    harness.clock.advance(30)
    assert waiting is not None
    first = error_of(waiting)
    assert not session.usable
    harness.sent()
    for call in (lambda: session.mail("a@example.com", {}),
                 lambda: session.data(Producer()), session.end_data, session.reset):
        assert error_of(call()) == first
    session.write_lines([b"ignored"])
    assert harness.sent() == b""
    assert outcome(session.quit()) is None


@pytest.mark.parametrize("garbage", [b"hello there\r\n", b"220-one\r\n250 two\r\n",
                                     b"2\r\n", b"x" * 5000 + b"\r\n"])
def test_garbage_reply(garbage: bytes) -> None:
    harness = Harness()
    harness.server(garbage)
    reply = harness.error()
    assert (reply.code, reply.enhanced) == (451, "4.5.0")
    assert reply.text.startswith("Upstream smtp.example.com:587 sent a")
    assert "during greeting" in reply.text
    assert harness.transport.disconnected


@pytest.mark.parametrize("reply", [b"220-more\r\n" * 101,
                                   (b"220-" + b"x" * 4000 + b"\r\n") * 17])
def test_an_endless_reply_is_cut_off(reply: bytes) -> None:
    """At most 100 lines or 64 KiB a reply: an upstream (or anyone on the path before
    TLS) cannot make the bridge hold an endless greeting."""
    harness = Harness()
    harness.server(reply)
    error = harness.error()
    assert (error.code, error.enhanced) == (451, "4.4.2")
    assert "more than 100 lines or 64 KiB during greeting" in error.text
    assert harness.transport.disconnected


def test_greeting_refused() -> None:
    harness = Harness()
    harness.server(b"554 5.3.2 go away\r\n")
    assert harness.error() == Reply(
        451, "4.3.2", "Upstream smtp.example.com:587 refused the session: 554 5.3.2 go away")
    assert harness.sent() == b""


def test_helo_fallback_reports_no_esmtp() -> None:
    harness = Harness()
    harness.server(b"220 old.example.com SMTP\r\n")
    harness.sent()
    harness.server(b"502 5.5.1 what?\r\n")
    assert harness.sent() == b"HELO bridge.test\r\n"
    harness.server(b"250 old.example.com\r\n")
    assert harness.error() == Reply(
        454, "4.7.0", "Upstream smtp.example.com:587 does not speak ESMTP; cannot use STARTTLS")
    assert harness.sent() == b"" and harness.transport.disconnecting


def test_helo_refused_too() -> None:
    harness = Harness()
    harness.server(b"220 x\r\n500 no\r\n")
    harness.server(b"500 no HELO either\r\n")
    assert harness.error() == Reply(
        451, "4.3.2", "Upstream smtp.example.com:587 refused EHLO and HELO: 500 no HELO either")


def test_no_starttls_sends_nothing_more() -> None:
    harness = Harness()
    harness.server(b"220 x\r\n")
    harness.sent()
    harness.server(b"250-x\r\n250-AUTH PLAIN LOGIN\r\n250 SIZE 100\r\n")
    assert harness.error() == Reply(
        454, "4.7.0", "Upstream smtp.example.com:587 does not offer STARTTLS; "
                      "the bridge never submits in clear text")
    assert harness.sent() == b""
    assert harness.transport.disconnecting


def test_starttls_refused() -> None:
    harness = Harness()
    harness.server(b"220 x\r\n250-x\r\n250 STARTTLS\r\n")
    harness.server(b"454 4.7.0 TLS not available\r\n")
    assert harness.error() == Reply(
        454, "4.7.0", "Upstream smtp.example.com:587 refused STARTTLS: 454 4.7.0 "
                      "TLS not available")


def test_clear_text_sent_ahead_of_tls_is_dropped() -> None:
    harness = Harness()
    harness.server(b"220 x\r\n250-x\r\n250 STARTTLS\r\n")
    harness.sent()
    harness.server(b"220 go ahead\r\n250 injected\r\n")
    assert harness.sent() == b"EHLO bridge.test\r\n"
    assert harness.result == []
    harness.protocol.handshakeCompleted()
    harness.server(EHLO_TLS)
    assert harness.sent().startswith(b"AUTH PLAIN")


@pytest.mark.parametrize("reason, words", [
    (SSL.Error([("SSL routines", "", "certificate verify failed")]),
     "certificate verify failed"),
    (VerificationError(errors=[]), "certificate does not match host smtp.example.com"),
])
def test_tls_handshake_failure(reason: Exception, words: str) -> None:
    harness, _ = _at_step("TLS handshake")
    harness.protocol.connectionLost(Failure(reason))
    assert harness.error() == Reply(
        454, "4.7.5", f"Upstream smtp.example.com:587 TLS failed: {words}")


def test_mail_passes_only_advertised_parameters() -> None:
    session = Harness().session()
    harness_transport = session._protocol.transport
    params: dict[str, str | None] = {"SIZE": "123", "BODY": "8BITMIME", "SMTPUTF8": None,
                                     "AUTH": "<>", "RET": "HDRS"}
    session.mail("a@example.com", params)
    assert harness_transport.value() == b"MAIL FROM:<a@example.com> SIZE=123 BODY=8BITMIME\r\n"
    session.features = {}
    harness_transport.clear()
    session.reset()
    session.mail("", params)
    assert harness_transport.value() == b"RSET\r\nMAIL FROM:<>\r\n"


def test_transaction_replies_are_returned_verbatim() -> None:
    harness = Harness()
    session = harness.session()
    mail = session.mail("a@example.com", {})
    harness.server(b"250 2.1.0 Ok\r\n")
    assert outcome(mail) == Reply(250, "2.1.0", "Ok")
    good, bad = session.rcpt("b@example.com", {}), session.rcpt("c@example.com", {})
    harness.server(b"250 2.1.5 Ok\r\n550-5.1.1 No such\r\n550 5.1.1 user here\r\n")
    assert outcome(good) == Reply(250, "2.1.5", "Ok")
    assert outcome(bad) == Reply(550, "5.1.1", "No such\nuser here")
    data = session.data(Producer())
    harness.server(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert outcome(data).code == 354
    harness.sent()
    session.write_lines([b".starts with a dot", b"8-bit \xff", b"."])
    session.write_lines([b"..", b""])
    assert harness.sent() == b"..starts with a dot\r\n8-bit \xff\r\n..\r\n...\r\n\r\n"
    assert not session.usable
    done = session.end_data()
    assert harness.sent() == b".\r\n"
    harness.server(b"451 4.3.0 try again later\r\n")
    assert outcome(done) == Reply(451, "4.3.0", "try again later")
    assert session.usable
    refused = session.data(Producer())
    harness.server(b"554 5.5.1 no valid recipients\r\n")
    assert outcome(refused) == Reply(554, "5.5.1", "no valid recipients")
    with pytest.raises(RuntimeError):
        session.write_lines([b"not in DATA"])


def test_producer_is_registered_with_the_transport_during_data() -> None:
    harness = Harness()
    session = harness.session()
    producer = Producer()
    data = session.data(producer)
    assert harness.transport.producer is None
    harness.server(b"354 go\r\n")
    assert outcome(data).code == 354
    assert harness.transport.producer._producer is producer and harness.transport.streaming
    session.end_data()
    assert harness.transport.producer is None


def test_abort_drops_the_connection() -> None:
    harness = Harness()
    session = harness.session()
    data = session.data(Producer())
    harness.server(b"354 go\r\n")
    assert outcome(data).code == 354
    session.write_lines([b"partial"])
    harness.sent()
    session.abort()
    assert harness.transport.disconnected and harness.sent() == b""
    assert not session.usable
    assert error_of(session.end_data()).code == 451
    assert harness.sent() == b""


def test_quit_never_fails() -> None:
    harness = Harness()
    session = harness.session()
    done = session.quit()
    assert harness.sent() == b"QUIT\r\n"
    harness.protocol.connectionLost(Failure(net_error.ConnectionLost()))
    assert outcome(done) is None
    assert not session.usable


def test_unexpected_reply_makes_the_session_unusable() -> None:
    harness = Harness()
    session = harness.session()
    harness.server(b"421 4.4.2 idle timeout\r\n")
    assert not session.usable
    reply = error_of(session.mail("a@example.com", {}))
    assert reply.code == 451 and "unexpected reply: 421 4.4.2 idle timeout" in reply.text


def test_connect_timeout() -> None:
    reactor = MemoryReactorClock()
    connecting = connect(reactor, Route("192.0.2.1", 587, timeout=5.0), ACCOUNT, "bridge.test",
                         tls_options=TLS_OPTIONS)
    reactor.advance(5)
    assert error_of(connecting) == Reply(451, "4.4.2",
                                         "Upstream 192.0.2.1:587 timed out during connect")


def test_bad_ca_bundle(tmp_path: Any) -> None:
    path = tmp_path / "empty.pem"
    path.write_text("nothing here\n")
    connecting = connect(MemoryReactorClock(), Route("smtp.example.com",
                                                     ca_certificates=str(path)), None, "b")
    reply = error_of(connecting)
    assert (reply.code, reply.enhanced) == (454, "4.7.5") and str(path) in reply.text


# Over loopback: the real aiosmtpd upstream with real TLS.

Start = Callable[..., Upstream]


def _connect(reactor: Any, route: Route, account: UpstreamAccount | None) -> UpstreamSession:
    return blockingCallFromThread(reactor, connect, reactor, route, account, "bridge.test")


def _refusal(reactor: Any, route: Route, account: UpstreamAccount | None) -> Reply:
    with pytest.raises(SMTPReplyError) as caught:
        _connect(reactor, route, account)
    return caught.value.reply


def _call(reactor: Any, function: Callable[..., Any], *args: Any) -> Any:
    return blockingCallFromThread(reactor, function, *args)


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _send(reactor: Any, session: UpstreamSession, lines: list[bytes],
          recipients: tuple[str, ...] = ("to@example.com",)) -> Reply:
    """One whole transaction; the reply to the final dot."""
    assert _call(reactor, session.mail, "from@example.com", {}).code == 250
    for recipient in recipients:
        _call(reactor, session.rcpt, recipient, {})
    assert _call(reactor, session.data, Producer()).code == 354
    _call(reactor, session.write_lines, lines)
    return _call(reactor, session.end_data)


BODY = [b"Subject: test", b"", b".leading dot", b"8-bit: \xc3\xa9\xff", b".", b"..", b"end"]


def test_full_session(reactor: Any, upstream: Upstream, logged: list[str]) -> None:
    session = _connect(reactor, upstream.route(), upstream.account())
    assert "STARTTLS" not in session.features and "SIZE" in session.features
    assert _call(reactor, session.mail, "from@example.com",
                 {"SIZE": "200", "BODY": "8BITMIME"}).code == 250
    assert _call(reactor, session.rcpt, "to@example.com", {}).code == 250
    assert _call(reactor, session.data, Producer()).code == 354
    _call(reactor, session.write_lines, BODY[:3])
    _call(reactor, session.write_lines, BODY[3:])
    assert _call(reactor, session.end_data) == Reply(250, "2.0.0", "OK queued")
    assert session.usable
    assert _send(reactor, session, [b"second"]).code == 250
    _call(reactor, session.quit)
    assert not session.usable
    first, second = upstream.stored()
    assert first.sender == "from@example.com" and first.recipients == ["to@example.com"]
    assert first.content == b"".join(line + b"\r\n" for line in BODY)
    assert first.mail_options == ["SIZE=200", "BODY=8BITMIME"]
    assert second.content == b"second\r\n"
    assert upstream.logins == [("PLAIN", upstream.username, True)]
    assert upstream.clear_text() == b"EHLO bridge.test\r\nSTARTTLS\r\n"
    assert any(f"upstream {upstream.host}:{upstream.port}: TLS TLSv1." in line
               and f"authenticated as {upstream.username}" in line for line in logged)
    assert not any(upstream.password in line for line in logged)


def test_login_only_upstream(reactor: Any, upstream_factory: Start) -> None:
    server = upstream_factory(auth_mechanisms=["LOGIN"])
    session = _connect(reactor, server.route(), server.account())
    assert _send(reactor, session, [b"hi"]).code == 250
    _call(reactor, session.quit)
    assert server.logins == [("LOGIN", server.username, True)]


def test_implicit_tls(reactor: Any, upstream_factory: Start) -> None:
    server = upstream_factory(implicit_tls=True)
    session = _connect(reactor, server.route(), server.account())
    assert _send(reactor, session, [b"hi"]).code == 250
    _call(reactor, session.quit)
    assert server.logins == [("PLAIN", server.username, True)]
    assert server.clear_text() == b""
    assert len(server.stored()) == 1


def test_implicit_tls_certificate_for_another_host(reactor: Any, upstream_factory: Start) -> None:
    server = upstream_factory(implicit_tls=True, certificate_names=["wrong.example"])
    reply = _refusal(reactor, server.route(), server.account())
    assert reply == Reply(454, "4.7.5", f"Upstream localhost:{server.port} TLS failed: "
                                        "certificate does not match host localhost")


def test_recipient_rejected_verbatim(reactor: Any, upstream_factory: Start) -> None:
    server = upstream_factory(reject_recipients={"nobody@example.com": "550 5.1.1 No such user"})
    session = _connect(reactor, server.route(), server.account())
    _call(reactor, session.mail, "a@example.com", {})
    assert _call(reactor, session.rcpt, "one@example.com", {}).code == 250
    assert _call(reactor, session.rcpt, "nobody@example.com", {}) == Reply(
        550, "5.1.1", "No such user")
    assert _call(reactor, session.rcpt, "two@example.com", {}).code == 250
    _call(reactor, session.data, Producer())
    _call(reactor, session.write_lines, [b"hi"])
    assert _call(reactor, session.end_data).code == 250
    _call(reactor, session.quit)
    [message] = server.stored()
    assert message.recipients == ["one@example.com", "two@example.com"]


def test_failure_at_end_of_data_returned(reactor: Any, upstream_factory: Start) -> None:
    server = upstream_factory(data_reply="451 4.3.0 try again")
    session = _connect(reactor, server.route(), server.account())
    assert _send(reactor, session, [b"hi"]) == Reply(451, "4.3.0", "try again")
    assert session.usable
    _call(reactor, session.quit)
    assert server.stored() == []


def test_upstream_down(reactor: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reply = _refusal(reactor, Route("127.0.0.1", port, timeout=5.0), ACCOUNT)
    assert reply == Reply(451, "4.4.1", f"Upstream 127.0.0.1:{port} unreachable: "
                                        "connection refused")


def test_certificate_for_another_host(reactor: Any, upstream_factory: Start) -> None:
    server = upstream_factory(certificate_names=["wrong.example"])
    reply = _refusal(reactor, server.route(), server.account())
    assert reply == Reply(454, "4.7.5", f"Upstream localhost:{server.port} TLS failed: "
                                        "certificate does not match host localhost")
    assert server.logins == []


def test_certificate_not_trusted(reactor: Any, upstream: Upstream) -> None:
    reply = _refusal(reactor, upstream.route(ca_certificates=None), upstream.account())
    assert reply == Reply(454, "4.7.5", f"Upstream localhost:{upstream.port} TLS failed: "
                                        "certificate verify failed")
    assert upstream.logins == []


def test_ca_bundle_without_the_issuer(reactor: Any, upstream: Upstream, tmp_path: Any) -> None:
    bundle = write_ca_bundle(str(tmp_path / "other.pem"), trust_test_ca=False)
    reply = _refusal(reactor, upstream.route(ca_certificates=bundle), upstream.account())
    assert (reply.code, reply.enhanced) == (454, "4.7.5")
    assert reply.text.endswith("TLS failed: certificate verify failed")


def test_certificate_expired(reactor: Any, upstream_factory: Start) -> None:
    server = upstream_factory(expired_certificate=True)
    reply = _refusal(reactor, server.route(), server.account())
    assert (reply.code, reply.enhanced) == (454, "4.7.5")
    assert reply.text.endswith("TLS failed: certificate verify failed")


def test_upstream_without_starttls(reactor: Any, upstream_factory: Start) -> None:
    server = upstream_factory(starttls=False)
    reply = _refusal(reactor, server.route(), server.account())
    assert reply == Reply(454, "4.7.0", f"Upstream localhost:{server.port} does not offer "
                                        "STARTTLS; the bridge never submits in clear text")
    time.sleep(0.1)
    assert server.clear_text() == b"EHLO bridge.test\r\n"
    assert server.logins == []


def test_wrong_password(reactor: Any, upstream: Upstream, logged: list[str]) -> None:
    wrong = "not-the-Password-9"
    reply = _refusal(reactor, upstream.route(), upstream.account(password=wrong))
    assert (reply.code, reply.enhanced) == (454, "4.7.0")
    assert reply.text.startswith(f"Upstream localhost:{upstream.port} rejected the login of "
                                 f"{upstream.username}: 535")
    assert wrong not in str(SMTPReplyError(reply))
    assert upstream.logins == [("PLAIN", upstream.username, False)]
    assert any("rejected the login" in line for line in logged)
    assert not any(wrong in line for line in logged)


def test_abort_mid_data_stores_nothing(reactor: Any, upstream: Upstream) -> None:
    session = _connect(reactor, upstream.route(), upstream.account())
    _call(reactor, session.mail, "a@example.com", {})
    _call(reactor, session.rcpt, "b@example.com", {})
    assert _call(reactor, session.data, Producer()).code == 354
    _call(reactor, session.write_lines, [b"Subject: half", b"", b"the first half"])
    _wait_for(lambda: any(b"the first half" in data for _, data in upstream.received))
    _call(reactor, session.abort)
    assert not session.usable
    with pytest.raises(SMTPReplyError):
        _call(reactor, session.end_data)
    time.sleep(0.2)
    assert upstream.stored() == []
    # Nothing followed the body: above all, no final dot.
    assert b"".join(data for _, data in upstream.received).endswith(b"the first half\r\n")
    # The upstream is still fine for the next session.
    again = _connect(reactor, upstream.route(), upstream.account())
    assert _send(reactor, again, [b"whole"]).code == 250
    _call(reactor, again.quit)
    assert [message.content for message in upstream.stored()] == [b"whole\r\n"]
