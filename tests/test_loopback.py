"""The running bridge on loopback, driven by real clients: smtplib, swaks, raw sockets."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import time

import pytest

from tests.conftest import PASSWORD, USER, client_context, start_bridge, stop_bridge

SENDER = "scanner@example.com"
RECIPIENT = "office@example.com"


def make_message(size: int, seed: int = 0) -> bytes:
    """A message of about C{size} bytes: CRLF lines, many starting with '.', 8-bit bytes."""
    if size < 10:
        return b"x" * size
    rnd = random.Random(seed)
    header = b"From: <scanner@example.com>\r\nTo: <office@example.com>\r\nSubject: scan\r\n\r\n"
    parts = [header]
    total = len(header)
    index = 0
    while total < size:
        index += 1
        body = rnd.randbytes(rnd.randrange(0, 120)).replace(b"\r", b"R").replace(b"\n", b"N")
        if index % 7 == 0:
            body = b"." + body
        elif index % 11 == 0:
            body = b"."
        elif index % 13 == 0:
            body = b".."
        line = body + b"\r\n"
        parts.append(line)
        total += len(line)
    return b"".join(parts)


def on_the_wire(message: bytes) -> bytes:
    """What a client sends as message content: SMTP ends the content with CRLF."""
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RawClient:
    """A line-level SMTP client on a plain socket, for the odd behaviours."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; got {lines!r} {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return lines

    def code(self) -> str:
        return self.reply()[-1][:3]

    def nothing_more(self, wait: float = 0.3) -> bool:
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return self.buffer == b""
        finally:
            self.sock.settimeout(10)
        return data == b"" and self.buffer == b""

    def close(self) -> None:
        self.sock.close()


# Real clients through both kinds of listener.

def test_smtplib_over_implicit_tls_with_auth(bridge, demo_upstream, certificate):
    message = make_message(2000)
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(SENDER, [RECIPIENT], message) == {}
    assert demo_upstream.messages() == [message]


def test_smtplib_over_starttls_with_auth(bridge, demo_upstream, certificate):
    message = make_message(2000, seed=1)
    with smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=30) as client:
        client.starttls(context=client_context(certificate))
        client.login(USER, PASSWORD)
        client.sendmail(SENDER, [RECIPIENT], message)
    assert demo_upstream.messages() == [message]


@pytest.mark.parametrize("size", [1, 1 << 20, 20 << 20], ids=["1B", "1MiB", "20MiB"])
def test_stored_bytes_equal_sent_bytes(bridge, demo_upstream, certificate, size):
    message = make_message(size, seed=size)
    assert any(line.startswith(b".") for line in message.split(b"\r\n")) or size < 10
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=120) as client:
        client.login(USER, PASSWORD)
        client.sendmail(SENDER, [RECIPIENT], message, mail_options=["BODY=8BITMIME"])
    [stored] = demo_upstream.messages()
    assert sha(stored) == sha(on_the_wire(message))


swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")


def run_swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", "--server", "127.0.0.1", "--from", SENDER, "--to", RECIPIENT,
                           "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
                           "--header", "Subject: swaks test", "--body", "from swaks", *args],
                          capture_output=True, text=True, timeout=60)


@swaks
def test_swaks_tls_on_connect(bridge, demo_upstream):
    result = run_swaks("--port", str(bridge.ports["smtps"]), "--tls-on-connect")
    assert result.returncode == 0, result.stdout + result.stderr
    [stored] = demo_upstream.messages()
    assert b"Subject: swaks test" in stored and b"from swaks" in stored


@swaks
def test_swaks_starttls(bridge, demo_upstream):
    result = run_swaks("--port", str(bridge.ports["legacy"]), "-tls")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STARTTLS" in result.stdout
    [stored] = demo_upstream.messages()
    assert b"from swaks" in stored


@swaks
def test_the_demo_upstream_logs_apart_from_the_bridge(bridge, demo_upstream, logged):
    """One message through the bridge into the demo upstream: one session in each
    namespace, and every line of the demo upstream's says "demo upstream"."""
    result = run_swaks("--port", str(bridge.ports["legacy"]), "-tls")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(demo_upstream.messages()) == 1
    deadline = time.monotonic() + 10
    while sum(" status=sent " in line for line in logged[0::3]) < 2:  # both summary lines
        assert time.monotonic() < deadline, logged[0::3]
        time.sleep(0.05)
    sessions: dict[str, set[str]] = {}
    for text, event in zip(logged[0::3], logged[2::3], strict=True):
        namespace = re.search(r"'log_namespace': '([^']*)'", event)
        session = re.search(r"'session': '(\w+)'", event)
        if namespace is None or session is None:
            continue
        namespace, session = namespace[1], session[1]
        sessions.setdefault(namespace, set()).add(session)
        assert text.startswith("demo upstream ") == (namespace == "smtpbridge.demo"), text
    assert {name: len(ids) for name, ids in sessions.items()} == {
        "smtpbridge.server": 1, "smtpbridge.demo": 1}, sessions
    assert any(line.startswith("demo upstream ") and " AUTH ok: user 'bridge'" in line
               for line in logged[0::3])


# Behaviour on the wire.

def test_pipelined_session(bridge, demo_upstream):
    client = RawClient(bridge.ports["legacy"])
    assert client.code() == "220"
    client.send(b"EHLO pipeliner\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
                b"RCPT TO:<c@example.com>\r\nDATA\r\n")
    assert [client.code() for _ in range(5)] == ["250", "250", "250", "250", "354"]
    client.send(b"Subject: pipelined\r\n\r\nhello\r\n.\r\nRSET\r\nQUIT\r\n")
    assert [client.code() for _ in range(3)] == ["250", "250", "221"]
    client.close()
    assert demo_upstream.messages() == [b"Subject: pipelined\r\n\r\nhello\r\n"]


def test_starttls_injection_is_not_answered(bridge, certificate):
    client = RawClient(bridge.ports["legacy"])
    client.reply()
    client.send(b"EHLO injector\r\n")
    client.reply()
    client.send(b"STARTTLS\r\nRSET\r\n")
    assert client.code() == "220"
    assert client.nothing_more(), "a command sent with STARTTLS was answered in clear text"
    tls = client_context(certificate).wrap_socket(client.sock, server_hostname="localhost")
    client.sock = tls
    client.send(b"VRFY someone\r\n")
    # Had RSET been kept, its 250 would come first.
    assert client.reply() == ["252 2.0.0 Cannot VRFY user, but will accept message and "
                              "attempt delivery"]
    client.close()


def test_auth_before_tls_is_refused(bridge):
    client = RawClient(bridge.ports["legacy"])
    client.reply()
    client.send(b"EHLO c\r\n")
    assert not any("AUTH" in line for line in client.reply())
    client.send(b"AUTH PLAIN AGRldmljZQBwYXNz\r\n")
    assert client.reply() == ["538 5.7.11 Encryption required for requested authentication "
                              "mechanism; use STARTTLS first"]
    client.close()


def test_unauthenticated_relay_is_refused(reactor, bridge_config, tmp_path, certificate,
                                          demo_upstream):
    config = bridge_config.replace('trusted_networks = ["127.0.0.0/8"]',
                                   'trusted_networks = ["192.0.2.0/24"]')
    running = start_bridge(reactor, config, str(tmp_path))
    try:
        client = RawClient(running.ports["legacy"])
        client.reply()
        client.send(b"EHLO stranger\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
                    b"DATA\r\n")
        assert [client.code() for _ in range(4)] == ["250", "530", "503", "503"]
        client.close()
        with smtplib.SMTP_SSL("127.0.0.1", running.ports["smtps"],
                              context=client_context(certificate), timeout=30) as smtps:
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                smtps.sendmail(SENDER, [RECIPIENT], b"no auth")
            assert refused.value.smtp_code == 530
        assert demo_upstream.messages() == []
    finally:
        stop_bridge(reactor, running)


def test_client_gone_mid_data_stores_nothing(bridge, demo_upstream):
    client = RawClient(bridge.ports["legacy"])
    client.reply()
    client.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert [client.code() for _ in range(4)] == ["250", "250", "250", "354"]
    client.send(b"Subject: half\r\n\r\n" + b"x" * 5000 + b"\r\n")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    probe = RawClient(bridge.ports["legacy"])  # the bridge is still fine
    assert probe.code() == "220"
    probe.send(b"QUIT\r\n")
    assert probe.code() == "221"
    assert demo_upstream.messages() == []


def test_tls_below_the_floor_is_refused(bridge, certificate):
    context = client_context(certificate)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with pytest.raises((ssl.SSLError, ConnectionError)):
        smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"], context=context, timeout=10)
