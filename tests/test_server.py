"""The downstream SMTP state machine, in memory (StringTransport + Clock)."""

from __future__ import annotations

import base64

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from smtpbridge.demo import SingleUserChecker
from smtpbridge.model import Reply
from smtpbridge.networks import NetworkSet, parse_network
from smtpbridge.policy import AccessPolicy
from smtpbridge.server import ListenerSettings, SMTPServerFactory
from smtpbridge.testing import MemoryDelivery

TRUSTED = "127.0.0.1"
STRANGER = "198.51.100.7"


class TLSCapableTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    tls_started = None

    def startTLS(self, context):  # noqa: N802
        self.tls_started = context


class Session:
    def __init__(self, peer: str = TRUSTED, checker: object = "default", now: float = 0.0,
                 **settings: object) -> None:
        settings.setdefault("tls", "starttls")
        settings.setdefault("auth_required", False)
        settings.setdefault("received_header", False)
        self.clock = Clock()
        self.clock.advance(now)
        self.delivery = MemoryDelivery()
        if checker == "default":
            checker = SingleUserChecker({"alice": "s3cret"})
        policy = AccessPolicy(NetworkSet.parse(["127.0.0.0/8"]))
        self.factory = SMTPServerFactory(
            ListenerSettings(name="test", hostname="bridge.test", **settings),
            self.delivery, policy, checker, self.clock, tls=object())
        self.protocol = self.factory.buildProtocol(None)
        self.transport = TLSCapableTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.protocol.makeConnection(self.transport)
        if settings["tls"] == "implicit":
            self.protocol.handshakeCompleted()  # as if the TLS handshake went through
        self.greeting = self.read()

    def send(self, data: bytes | str) -> None:
        self.protocol.dataReceived(data.encode() if isinstance(data, str) else data)

    def read(self) -> list[str]:
        value = self.transport.value().decode()
        self.transport.clear()
        assert value == "" or value.endswith("\r\n"), value
        return value.split("\r\n")[:-1]

    def command(self, line: str) -> list[str]:
        self.send(line + "\r\n")
        return self.read()

    def codes(self) -> list[str]:
        return [line[:3] for line in self.read() if line[3:4] != "-"]

    def tls(self) -> None:
        """Pretend STARTTLS happened."""
        assert self.command("STARTTLS")[0].startswith("220")
        assert self.transport.tls_started is not None
        self.protocol.handshakeCompleted()

    def login(self) -> None:
        token = base64.b64encode(b"\0alice\0s3cret").decode()
        assert self.command(f"AUTH PLAIN {token}")[0].startswith("235")


def test_greeting_names_the_host():
    s = Session()
    assert s.greeting == ["220 bridge.test ESMTP smtpbridge"]


def test_ehlo_before_tls_offers_starttls_and_not_auth():
    s = Session()
    lines = s.command("EHLO client.test")
    assert lines[0] == "250-bridge.test"
    keywords = [line[4:] for line in lines]
    assert "STARTTLS" in keywords and "PIPELINING" in keywords
    assert "SIZE 36700160" in keywords and "8BITMIME" in keywords
    assert "ENHANCEDSTATUSCODES" in keywords
    assert not any(k.startswith("AUTH") for k in keywords)
    assert lines[-1].startswith("250 ") and all(x.startswith("250-") for x in lines[:-1])


def test_ehlo_after_starttls_offers_auth_and_no_starttls():
    s = Session()
    s.command("EHLO client.test")
    s.tls()
    keywords = [line[4:] for line in s.command("EHLO client.test")]
    assert "AUTH PLAIN LOGIN" in keywords
    assert "STARTTLS" not in keywords


def test_implicit_tls_listener_offers_auth_but_never_starttls():
    s = Session(tls="implicit")
    keywords = [line[4:] for line in s.command("EHLO client.test")]
    assert "AUTH PLAIN LOGIN" in keywords and "STARTTLS" not in keywords
    assert s.command("STARTTLS")[0].startswith("503 5.5.1")


def test_plaintext_listener_without_tls():
    s = Session(tls="none", allow_plaintext_auth=True)
    keywords = [line[4:] for line in s.command("EHLO client.test")]
    assert "STARTTLS" not in keywords and "AUTH PLAIN LOGIN" in keywords
    assert s.command("STARTTLS")[0].startswith("502 5.5.1")
    s.login()


def test_no_auth_offered_without_users():
    s = Session(tls="implicit", checker=None)
    keywords = [line[4:] for line in s.command("EHLO client.test")]
    assert not any(k.startswith("AUTH") for k in keywords)
    assert s.command("AUTH PLAIN AGFAYg==")[0].startswith("503")


def test_mail_and_auth_without_helo_are_accepted_by_default():
    """As Postfix (smtpd_helo_required = no): some embedded stacks never say HELO."""
    s = Session()
    assert s.command("MAIL FROM:<a@example.com>")[0].startswith("250")
    assert s.command("RSET")[0].startswith("250")
    assert s.command("HELO printer")[0] == "250 bridge.test"
    assert s.command("MAIL FROM:<a@example.com>")[0].startswith("250")
    implicit = Session(tls="implicit")
    implicit.login()
    assert implicit.protocol.client.login == "alice"


def test_require_helo_refuses_mail_and_auth_before_helo():
    s = Session(tls="implicit", require_helo=True)
    assert s.command("MAIL FROM:<a@example.com>")[0].startswith("503 5.5.1")
    assert s.command("AUTH PLAIN AGFsaWNlAHMzY3JldA==")[0].startswith("503 5.5.1")
    assert s.command("HELO printer")[0] == "250 bridge.test"
    s.login()
    assert s.command("MAIL FROM:<a@example.com>")[0].startswith("250")


def test_sequence_errors():
    s = Session()
    s.command("EHLO c")
    assert s.command("RCPT TO:<b@example.com>")[0].startswith("503 5.5.1")
    assert s.command("DATA")[0].startswith("503 5.5.1")
    s.command("MAIL FROM:<a@example.com>")
    assert s.command("MAIL FROM:<a@example.com>")[0].startswith("503 5.5.1")
    assert s.command("DATA")[0].startswith("503 5.5.1")


def test_unknown_and_malformed_commands_leave_the_session_usable():
    s = Session()
    assert s.command("FROBNICATE")[0].startswith("500 5.5.2")
    assert s.command("")[0].startswith("500 5.5.2")
    assert s.command("EHLO")[0].startswith("501 5.5.4")
    s.command("EHLO c")
    assert s.command("MAIL FROM:<not an address>")[0].startswith("501")
    assert s.command("MAIL TO:<a@b.c>")[0].startswith("501 5.5.4")
    assert s.command("NOOP")[0] == "250 2.0.0 Ok"


def test_small_commands():
    s = Session()
    assert s.command("NOOP")[0].startswith("250 2.0.0")
    assert s.command("RSET")[0].startswith("250 2.0.0")
    assert s.command("VRFY someone")[0].startswith("252 2.0.0")
    assert s.command("HELP")[0].startswith("214 2.0.0")
    assert s.command("EXPN list")[0].startswith("502 5.5.1")
    assert s.command("QUIT") == ["221 2.0.0 Bye"]
    assert s.transport.disconnecting


def test_lower_case_commands():
    s = Session()
    assert s.command("ehlo c")[0].startswith("250")
    assert s.command("mail from:<a@example.com>")[0].startswith("250")
    assert s.command("rcpt to:<b@example.com>")[0].startswith("250")


@pytest.mark.parametrize("chunks", [1, 7])
def test_over_long_line_is_refused_and_the_session_goes_on(chunks):
    s = Session()
    data = b"NOOP " + b"x" * 20000 + b"\r\nNOOP\r\n"
    step = len(data) // chunks + 1
    for i in range(0, len(data), step):
        s.send(data[i:i + step])
    assert s.codes() == ["500", "250"]
    assert not s.transport.disconnecting


def test_idle_timeout_closes_with_421():
    s = Session()
    s.clock.advance(299)
    s.command("NOOP")
    s.clock.advance(299)
    assert not s.transport.disconnecting
    s.clock.advance(2)
    assert s.read()[0].startswith("421 4.4.2")
    assert s.transport.disconnecting


def test_too_many_errors_end_the_session():
    s = Session()
    for _ in range(19):
        s.command("BOGUS")
    assert not s.transport.disconnecting
    lines = s.command("BOGUS")
    assert lines[-1].startswith("421 4.7.0")
    assert s.transport.disconnecting


# Pipelining (RFC 2920).

def test_pipelined_replies_wait_for_the_delivery_and_keep_their_order():
    s = Session()
    s.command("EHLO c")
    s.delivery.hold_replies = True
    s.send("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
           "RCPT TO:<c@example.com>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert s.read() == []  # nothing answered while MAIL's reply is pending
    for expected in (["250"], ["250"], ["250"], ["354"], ["250", "221"]):
        d, reply = s.delivery.waiting.pop(0)
        assert s.read() == []
        d.callback(reply)
        assert s.codes() == expected
    assert s.transport.disconnecting
    assert s.delivery.messages[0].data == b"Subject: hi\r\n\r\nbody\r\n"
    assert s.delivery.messages[0].recipients == ["b@example.com", "c@example.com"]


def test_quit_right_after_the_dot_still_gets_the_data_reply_first():
    s = Session()
    s.command("EHLO c")
    s.command("MAIL FROM:<a@example.com>")
    s.command("RCPT TO:<b@example.com>")
    s.command("DATA")
    s.delivery.hold_replies = True
    s.send("x\r\n.\r\nQUIT\r\n")
    assert s.read() == []
    s.delivery.release_all()
    assert s.codes() == ["250", "221"]
    assert s.transport.disconnecting


def test_pipelining_without_waiting_for_ehlo():
    s = Session()
    s.send("EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
           "hello\r\n.\r\nQUIT\r\n")
    assert s.codes() == ["250", "250", "250", "354", "250", "221"]
    assert s.delivery.messages[0].data == b"hello\r\n"


# STARTTLS.

def test_starttls_discards_commands_sent_with_it():
    s = Session(require_helo=True)
    s.command("EHLO c")
    s.send("STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\n")
    assert s.read() == ["220 2.0.0 Ready to start TLS"]
    assert s.transport.tls_started is not None
    s.protocol.handshakeCompleted()
    # The session starts over: no HELO yet, and nothing was queued.
    assert s.command("MAIL FROM:<a@example.com>")[0].startswith("503")
    assert s.delivery.transactions == []


def test_starttls_twice_and_with_argument():
    s = Session()
    assert s.command("STARTTLS now")[0].startswith("501")
    s.tls()
    assert s.command("STARTTLS")[0].startswith("503 5.5.1")


# AUTH (RFC 4954).

def test_auth_before_tls_is_refused_with_538():
    s = Session()
    s.command("EHLO c")
    assert s.command("AUTH PLAIN AGFsaWNlAHMzY3JldA==")[0].startswith("538 5.7.11")
    assert s.command("AUTH LOGIN")[0].startswith("538 5.7.11")


def test_auth_plain_with_initial_response():
    s = Session(tls="implicit")
    s.command("EHLO c")
    s.login()
    assert s.protocol.client.login == "alice"
    assert s.command("AUTH PLAIN AGFsaWNlAHMzY3JldA==")[0].startswith("503")


def test_auth_plain_without_initial_response():
    s = Session(tls="implicit")
    s.command("EHLO c")
    assert s.command("AUTH PLAIN") == ["334 "]
    assert s.command(base64.b64encode(b"\0alice\0s3cret").decode())[0].startswith("235 2.7.0")


def test_auth_login_both_ways():
    s = Session(tls="implicit")
    s.command("EHLO c")
    assert s.command("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    assert s.command(base64.b64encode(b"alice").decode()) == ["334 UGFzc3dvcmQ6"]
    assert s.command(base64.b64encode(b"s3cret").decode())[0].startswith("235")
    s2 = Session(tls="implicit")
    s2.command("EHLO c")
    assert s2.command("AUTH LOGIN " + base64.b64encode(b"alice").decode()) == ["334 UGFzc3dvcmQ6"]
    assert s2.command(base64.b64encode(b"wrong").decode())[0].startswith("535 5.7.8")
    assert s2.protocol.client.login is None


def test_auth_errors():
    s = Session(tls="implicit")
    s.command("EHLO c")
    assert s.command("AUTH CRAM-MD5")[0].startswith("504 5.5.4")
    assert s.command("AUTH PLAIN !!!notbase64")[0].startswith("501 5.5.2")
    s.command("AUTH LOGIN")
    assert s.command("*")[0].startswith("501 5.0.0")
    assert s.command("AUTH PLAIN " + base64.b64encode(b"bob\0alice\0s3cret").decode())[0] \
        .startswith("501")
    assert s.command("NOOP")[0].startswith("250")


def test_auth_required_listener_refuses_mail_until_auth():
    s = Session(tls="implicit", auth_required=True, peer=TRUSTED)
    s.command("EHLO c")
    assert s.command("MAIL FROM:<a@example.com>")[0] == "530 5.7.0 Authentication required"
    s.login()
    assert s.command("MAIL FROM:<a@example.com>")[0].startswith("250")
    assert s.delivery.transactions[0].client.login == "alice"


def test_optional_auth_trusts_only_trusted_networks():
    s = Session(peer=TRUSTED)
    s.command("EHLO c")
    assert s.command("MAIL FROM:<a@example.com>")[0].startswith("250")
    stranger = Session(peer=STRANGER)
    stranger.command("EHLO c")
    assert stranger.command("MAIL FROM:<a@example.com>")[0].startswith("530 5.7.0")
    assert stranger.command("RCPT TO:<b@example.com>")[0].startswith("503")
    assert stranger.delivery.transactions == []


# MAIL parameters.

def test_mail_parameters():
    s = Session(max_message_size=10_000)
    s.command("EHLO c")
    assert s.command("MAIL FROM:<a@b.example> SIZE=20000")[0].startswith("552 5.3.4")
    assert s.command("MAIL FROM:<a@b.example> SIZE=abc")[0].startswith("501 5.5.4")
    assert s.command("MAIL FROM:<a@b.example> BODY=BINARYMIME")[0].startswith("501 5.5.4")
    assert s.command("MAIL FROM:<a@b.example> FOO=1")[0].startswith("555 5.5.4")
    assert s.command("MAIL FROM:<a@b.example> SIZE=500 BODY=8bitmime AUTH=<>")[0] \
        .startswith("250")
    assert s.delivery.transactions[-1].sender_params == {"SIZE": "500", "BODY": "8BITMIME"}


def test_mail_from_with_a_space_and_null_sender():
    s = Session()
    s.command("EHLO c")
    assert s.command("MAIL FROM: <a@example.com>")[0].startswith("250")
    s.command("RSET")
    assert s.command("MAIL FROM:<>")[0].startswith("250")
    assert s.delivery.transactions[-1].sender == ""


# The body.

def _to_data(s: Session) -> None:
    s.command("EHLO c")
    s.command("MAIL FROM:<a@example.com>")
    s.command("RCPT TO:<b@example.com>")
    assert s.command("DATA")[0].startswith("354")


def test_body_is_unstuffed_and_canonical():
    s = Session()
    _to_data(s)
    s.send(b"Subject: x\n\n..leading dot\r\n8bit \xe9\xff\r\n.\r\n")
    assert s.codes() == ["250"]
    assert s.delivery.messages[0].data == b"Subject: x\r\n\r\n.leading dot\r\n8bit \xe9\xff\r\n"


def test_message_over_the_size_limit_is_refused_and_not_delivered():
    s = Session(max_message_size=2000)
    _to_data(s)
    s.send(b"x" * 900 + b"\r\n")
    s.send(b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n.\r\n")
    assert s.codes() == ["552"]
    assert s.delivery.transactions[0].aborted and s.delivery.messages == []
    assert s.command("NOOP")[0].startswith("250")


def test_client_gone_mid_data_aborts_the_transaction():
    s = Session()
    _to_data(s)
    s.send(b"Subject: half\r\n\r\nsome of the body\r\n")
    s.protocol.connectionLost(None)
    transaction = s.delivery.transactions[0]
    assert transaction.aborted and not transaction.finished
    assert s.delivery.messages == []


def test_refused_recipient_and_no_valid_recipients():
    s = Session()
    s.delivery.refused_recipients["bad@example.com"] = Reply(550, "5.1.1", "No such user")
    s.command("EHLO c")
    s.command("MAIL FROM:<a@example.com>")
    assert s.command("RCPT TO:<bad@example.com>") == ["550 5.1.1 No such user"]
    assert s.command("DATA")[0].startswith("554 5.5.1")


def test_delivery_refusing_data_ends_the_transaction():
    s = Session()
    s.delivery.replies["data"] = Reply(451, "4.3.0", "try later")
    _to_data_reply = None
    s.command("EHLO c")
    s.command("MAIL FROM:<a@example.com>")
    s.command("RCPT TO:<b@example.com>")
    _to_data_reply = s.command("DATA")
    assert _to_data_reply == ["451 4.3.0 try later"]
    assert s.delivery.transactions[0].aborted
    assert s.command("RCPT TO:<b@example.com>")[0].startswith("503")


def test_data_reply_passes_through():
    s = Session()
    s.delivery.replies["finish"] = Reply(451, "4.7.1", "greylisted")
    _to_data(s)
    s.send(b"x\r\n.\r\n")
    assert s.read() == ["451 4.7.1 greylisted"]


def test_back_pressure_holds_the_client():
    s = Session()
    _to_data(s)
    producer = s.delivery.transactions[0].producer
    producer.pauseProducing()
    s.send(b"line one\r\n")
    assert s.transport.producerState == "paused"
    producer.resumeProducing()
    assert s.transport.producerState == "producing"
    s.send(b".\r\n")
    assert s.codes() == ["250"]


def test_the_body_producer_of_an_ended_transaction_moves_nothing():
    s = Session()
    _to_data(s)
    old = s.delivery.transactions[0].producer
    s.send(b"x\r\n.\r\n")
    assert s.codes() == ["250"]
    old.pauseProducing()  # a late pause, after the dot: the next command is read
    assert s.transport.producerState == "producing"
    _to_data(s)
    new = s.delivery.transactions[1].producer
    new.pauseProducing()
    assert s.transport.producerState == "paused"
    old.resumeProducing()  # a late resume: the new body stays paused
    old.stopProducing()
    assert s.transport.producerState == "paused"
    new.resumeProducing()
    assert s.transport.producerState == "producing"
    s.send(b"y\r\n.\r\n")
    assert s.codes() == ["250"]


def test_rset_aborts_the_transaction():
    s = Session()
    s.command("EHLO c")
    s.command("MAIL FROM:<a@example.com>")
    s.command("RSET")
    assert s.delivery.transactions[0].aborted
    assert s.command("RCPT TO:<b@example.com>")[0].startswith("503")


def test_received_header_comes_first_and_describes_the_session():
    s = Session(tls="implicit", received_header=True, received_header_login=True,
                now=1_795_400_000)
    s.command("EHLO scanner-7")
    s.login()
    s.command("MAIL FROM:<a@example.com>")
    s.command("RCPT TO:<b@example.com>")
    s.command("DATA")
    s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    data = s.delivery.messages[0].data
    header, _, rest = data.partition(b"\r\nSubject: x")
    assert rest == b"\r\n\r\nbody\r\n"
    assert header.startswith(b"Received: from scanner-7 ([127.0.0.1])")
    assert b"(authenticated as alice)" in header and b"with ESMTPA" in header
    assert b"(smtpbridge, listener test)" in header
    assert f"id {s.protocol.client.session_id}".encode() in header
    assert header.endswith(b"for <b@example.com>; Mon, 23 Nov 2026 02:13:20 +0000")


def test_sender_rules_refuse_with_553():
    from smtpbridge.policy import SenderRules

    s = Session(tls="implicit")
    s.factory.policy = AccessPolicy(
        NetworkSet.parse(["127.0.0.0/8"]),
        SenderRules({"alice": ["alice@example.com", "@dept.example.com"]},
                    [(parse_network("127.0.0.0/8"), ["@devices.example.com"])]))
    s.command("EHLO c")
    assert s.command("MAIL FROM:<x@devices.example.com>")[0].startswith("250")
    s.command("RSET")
    assert s.command("MAIL FROM:<x@other.example>") == [
        "553 5.7.1 Sender address <x@other.example> is not allowed for clients from "
        "[127.0.0.1]"]
    s.login()
    assert s.command("MAIL FROM:<x@devices.example.com>")[0].startswith("553 5.7.1")
    assert s.command("MAIL FROM:<Bob@Dept.Example.com>")[0].startswith("250")
    s.command("RSET")
    assert s.command("MAIL FROM:<alice@example.com>")[0].startswith("250")
    s.command("RSET")
    assert s.command("MAIL FROM:<>")[0].startswith("250")
    assert len(s.delivery.transactions) == 4  # the refused MAILs reached no delivery


def test_auth_failures_are_slowed_then_blocked():
    from smtpbridge.throttle import AuthThrottle, ThrottleSettings

    s = Session(tls="implicit", idle_timeout=3600)
    s.factory.throttle = AuthThrottle(s.clock, ThrottleSettings(
        failure_limit=3, window=600, block_time=900, delay_step=2, max_delay=10))
    s.command("EHLO c")
    bad = "AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong").decode()
    assert s.command(bad) == []  # the first failure waits 2 s
    s.clock.advance(2)
    assert s.codes() == ["535"]
    s.send(bad + "\r\n")
    s.clock.advance(3.9)
    assert s.read() == []
    s.clock.advance(0.1)
    assert s.codes() == ["535"]
    s.send(bad + "\r\n")
    s.clock.advance(6)
    assert s.codes() == ["535"]
    # Blocked now: even the right password is not checked.
    good = "AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret").decode()
    assert s.command(good) == ["454 4.7.0 Too many failed logins from your address; "
                               "try again later"]
    s.clock.advance(901)
    assert s.command(good)[0].startswith("235")


# SMTPUTF8 (RFC 6531): never a silent downgrade.

def test_a_utf8_sender_needs_the_smtputf8_parameter():
    s = Session()
    s.command("EHLO c")
    assert s.command("MAIL FROM:<jörg@example.de>") == [
        "553 5.6.7 Non-ASCII address needs MAIL FROM with SMTPUTF8"]
    assert s.delivery.transactions == []
    assert s.command("MAIL FROM:<jörg@example.de> SMTPUTF8")[0].startswith("250")
    assert s.delivery.transactions[0].sender_params == {"SMTPUTF8": None}
    assert s.command("RCPT TO:<bü@example.de>")[0].startswith("250")


def test_a_utf8_recipient_needs_the_smtputf8_parameter():
    s = Session()
    s.command("EHLO c")
    assert s.command("MAIL FROM:<a@example.com>")[0].startswith("250")
    assert s.command("RCPT TO:<bü@example.de>")[0].startswith("553 5.6.7 ")
    assert s.command("RCPT TO:<b@example.de>")[0].startswith("250")
    assert s.delivery.transactions[0].recipients == ["b@example.de"]


def test_remembered_logins_do_not_count_against_the_auth_rate_but_blocks_hold():
    from smtpbridge.throttle import AuthThrottle, ThrottleSettings
    from smtpbridge.users import UsersFileChecker, VerifiedLogins, hash_password

    clock = Clock()
    checker = UsersFileChecker({"alice": hash_password("s3cret", n=2**10)},
                               cache=VerifiedLogins(clock))
    throttle = AuthThrottle(clock, ThrottleSettings(
        failure_limit=2, delay_step=0, rate=1))  # one costly check per second
    good = "AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret").decode()
    bad = "AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong").decode()

    def login(line: str, peer: str = TRUSTED) -> str:
        s = Session(peer=peer, tls="implicit", checker=checker)
        s.factory.throttle = throttle
        s.command("EHLO c")
        return s.command(line)[0][:3]

    assert [login(good) for _ in range(5)] == ["235"] * 5  # one scrypt, four remembered
    assert login(bad) == "454"  # a guess is costly: the second in this second is refused
    clock.advance(1)
    assert login(bad, STRANGER) == "535"
    clock.advance(1)
    assert login(bad, STRANGER) == "535"
    assert login(good, STRANGER) == "454"  # blocked: not even a remembered password
    assert login(good) == "235"


def test_a_body_held_back_never_runs_as_commands_once_the_client_is_gone():
    """Body text that waited while the delivery held the body (a quoted SMTP dialogue)
    must not become commands when the connection ends."""
    s = Session()
    _to_data(s)
    [transaction] = s.delivery.transactions
    s.send("Subject: a transcript\r\n\r\n")
    transaction.producer.pauseProducing()  # the upstream takes no more for now
    s.send("MAIL FROM:<x@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
           "smuggled\r\n.\r\n")
    s.protocol.connectionLost(Failure(ConnectionLost()))
    assert transaction.aborted
    assert s.delivery.transactions == [transaction] and s.delivery.messages == []


def test_commands_queued_behind_a_reply_never_run_once_the_client_is_gone():
    s = Session()
    s.command("EHLO x")
    s.delivery.hold_replies = True
    s.send("MAIL FROM:<a@example.com>\r\nRSET\r\nMAIL FROM:<a@example.com>\r\n"
           "RCPT TO:<b@example.com>\r\nDATA\r\n")
    s.protocol.connectionLost(Failure(ConnectionDone()))
    for _ in range(5):
        s.delivery.release_all()
    [transaction] = s.delivery.transactions
    assert transaction.aborted
    assert s.clock.getDelayedCalls() == []  # no deadline keeps the session
    assert s.read() == []


def test_an_over_long_answer_to_an_auth_challenge_ends_the_exchange():
    s = Session(allow_plaintext_auth=True, auth_required=False, tls="none")
    s.command("EHLO x")
    assert s.command("AUTH LOGIN")[0].startswith("334")
    s.send(b"A" * 13000 + b"\r\n")
    assert s.codes() == ["500"]
    assert s.command("QUIT")[0].startswith("221")  # a command again, not a user name


@pytest.mark.parametrize("line", ["MAIL FROM:<a@example.com> SIZE=\u00b2",
                                  "MAIL FROM:<a@example.com> SIZE=\u0661\u0662"])
def test_a_size_in_digits_other_than_ascii_is_a_syntax_error(line):
    s = Session()
    s.command("EHLO c")
    assert s.command(line)[0].startswith("501")


@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
def test_a_greeting_whose_name_is_only_blanks_is_a_syntax_error(verb):
    s = Session()
    assert s.command(f"{verb} \u00a0\x1c")[0].startswith("501")
    assert s.command("EHLO c")[0].startswith("250")
