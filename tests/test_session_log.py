"""What a session logs, in memory: every refusal with the session id, the idle timeout with
what the session was doing, the size the client sent, and never a secret.  The same
lines from real clients are in L{tests.test_devices}."""

from __future__ import annotations

import base64

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smtpbridge.demo import demo_upstream_factory
from smtpbridge.testing import MemoryDelivery
from smtpbridge.tls import ServerTLS
from tests.test_server import Session

IDLE = 300


def said(logged: list[str], session: Session) -> list[str]:
    """The session's formatted log lines (those that start with its id)."""
    prefix = session.protocol.client.session_id + " "
    return [line for line in logged[0::3] if line.startswith(prefix)]


@pytest.fixture
def lines(logged):
    def of(session: Session) -> list[str]:
        return said(logged, session)
    return of


@pytest.mark.parametrize(("commands", "phase"), [
    ([], "greeting"),
    (["EHLO printer"], "EHLO"),
    (["HELO printer"], "HELO"),
    (["EHLO printer", "AUTH LOGIN"], "AUTH"),
    (["EHLO printer", "AUTH LOGIN", base64.b64encode(b"alice").decode()], "AUTH"),
    (["EHLO printer", "MAIL FROM:<a@example.com>"], "MAIL"),
    (["EHLO printer", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>"], "RCPT"),
    (["EHLO printer", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA",
      "Subject: x"], "DATA (12 bytes received)"),
    (["EHLO printer", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA",
      "body", "."], "end of message"),
])
def test_the_idle_timeout_says_what_the_session_was_doing(lines, commands, phase):
    s = Session(tls="implicit")
    for command in commands:
        s.command(command)
    s.clock.advance(IDLE + 1)
    assert s.read()[-1].startswith("421 4.4.2")
    assert f"{s.protocol.client.session_id} idle timeout after {phase}" in lines(s)


def test_auth_refusals_are_logged_without_secrets(lines):
    s = Session()
    s.command("EHLO printer")
    assert s.command("AUTH PLAIN AGFsaWNlAHMzY3JldA==")[0].startswith("538")
    implicit = Session(tls="implicit")
    implicit.command("EHLO printer")
    assert implicit.command("AUTH cram-md5")[0].startswith("504")
    # A client that sends its credentials where the mechanism goes: the name is not logged.
    assert implicit.command("AUTH YWxpY2U6czNjcmV0")[0].startswith("504")
    implicit.command("AUTH LOGIN")
    implicit.command("RCPT TO:<b@example.com>")
    implicit.command("AUTH LOGIN " + base64.b64encode(b"alice").decode())
    assert implicit.command(base64.b64encode(b"wrong").decode())[0].startswith("535")
    none = Session(tls="implicit", checker=None)
    none.command("AUTH PLAIN AGFsaWNlAHMzY3JldA==")
    sid = s.protocol.client.session_id
    assert lines(s)[-1] == (f"{sid} AUTH PLAIN refused: before TLS on listener test (the "
                             "client must use STARTTLS first)")
    text = lines(implicit)
    sid = implicit.protocol.client.session_id
    assert f"{sid} AUTH refused: unknown mechanism CRAM-MD5; the bridge offers PLAIN LOGIN" \
        in text
    assert f"{sid} AUTH refused: unknown mechanism (a name not shown); the bridge offers " \
           "PLAIN LOGIN" in text
    assert f"{sid} AUTH LOGIN: the answer to the challenge looks like a RCPT command; the " \
           "client did not wait for the 334 reply" in text
    assert f"{sid} AUTH failed for user 'alice' from [127.0.0.1] (LOGIN)" in text
    assert lines(none)[-1].endswith("AUTH PLAIN refused: no users to log in to on listener test")
    everything = "\n".join(text + lines(s) + lines(none))
    for secret in ("s3cret", "YWxpY2U6czNjcmV0", "AGFsaWNlAHMzY3JldA==", "d3Jvbmc="):
        assert secret not in everything


def test_helo_skipped_and_required(lines):
    s = Session(tls="implicit", received_header=True)
    s.login()
    s.command("MAIL FROM:<a@example.com>")
    s.command("RCPT TO:<b@example.com>")
    s.command("DATA")
    s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    header = s.delivery.messages[0].data.split(b"\r\nSubject: x")[0]
    assert header.startswith(b"Received: from [127.0.0.1] (no HELO)\r\n\tby bridge.test ")
    assert b"\twith SMTPA\r\n" in header  # no EHLO, so no ESMTP
    sid = s.protocol.client.session_id
    assert lines(s).count(f"{sid} AUTH without HELO/EHLO: accepted") == 1
    assert not any("MAIL without HELO" in line for line in lines(s))  # noted once
    strict = Session(require_helo=True)
    assert strict.command("MAIL FROM:<a@example.com>")[0].startswith("503 5.5.1")
    assert lines(strict)[-1].endswith(
        "MAIL refused: no HELO/EHLO yet (require_helo on listener test)")


def test_size_refusals_and_the_size_the_client_sent(lines):
    s = Session(max_message_size=2000)
    s.command("EHLO printer")
    assert s.command("MAIL FROM:<a@example.com> SIZE=5000")[0].startswith("552")
    assert lines(s)[-1].endswith("MAIL refused: SIZE=5000 is over the limit of 2000 bytes")
    s.command("MAIL FROM:<a@example.com> SIZE=1234")
    s.command("RCPT TO:<b@example.com>")
    s.command("DATA")
    # 1,200 octets on one line are folded, bare LFs become CRLF, a stuffed dot is unstuffed.
    message = b"Subject: x\n\n" + b"z" * 1200 + b"\r\n.. dotted\r\n"
    s.send(message + b".\r\n")
    assert s.read()[0].startswith("250")
    relayed = len(s.delivery.messages[0].data)
    assert relayed != len(message) - 1
    summary = next(line for line in lines(s) if " status=sent " in line)
    assert f" size={len(message) - 1} relayed={relayed} " in summary
    assert summary.endswith("(250 2.0.0 Ok: queued)")


def test_the_demo_upstreams_lines_are_labelled(logged):
    """The demo upstream's sessions log as smtpbridge.demo, each line saying so; the
    bridge's as smtpbridge.server."""
    factory = demo_upstream_factory(MemoryDelivery(), "demo", "pass", ServerTLS(None), Clock())
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1)))
    sid = protocol.client.session_id
    assert f"demo upstream {sid} connect from [127.0.0.1]:1 on listener demo-upstream" \
        in logged[0::3]
    assert any("'log_namespace': 'smtpbridge.demo'" in line and sid in line
               for line in logged[2::3])
    bridge = Session()
    assert bridge.protocol.log.namespace == "smtpbridge.server"
    assert f"{bridge.protocol.client.session_id} connect from [127.0.0.1]:40000 on listener " \
           "test" in logged[0::3]
