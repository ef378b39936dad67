"""In-line relay, end to end: legacy clients -> the bridge -> a real aiosmtpd upstream.

Every bridge here relays to an upstream from L{tests.upstream} that requires
STARTTLS and AUTH; the clients are smtplib, swaks and raw sockets.  The
upstream's own record (what it stored, every byte it received, in clear text
or under TLS) is the evidence.
"""

from __future__ import annotations

import base64
import re
import shutil
import smtplib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import (
    PASSWORD,
    USER,
    RunningBridge,
    client_context,
    front_toml,
    start_bridge,
    stop_bridge,
)
from tests.test_loopback import RawClient, make_message, on_the_wire, sha
from tests.upstream import Upstream, commands, upstream, upstream_factory

FIXTURES = (upstream, upstream_factory)  # pytest finds fixtures by module attribute

SENDER = "scanner@example.com"
RECIPIENT = "office@example.com"
HELO_NAME = "localhost"  # the bridge's [server] hostname, which it also uses upstream

Start = Callable[..., Upstream]
Relay = Callable[..., RunningBridge]


# The bridge in front of an upstream.

@pytest.fixture
def relay_toml(certificate: tuple[str, str], users_file: str,
               tmp_path: Any) -> Callable[..., str]:
    """Builds the TOML of a bridge relaying to an L{Upstream}.

    Two listeners on loopback: "smtps" (implicit TLS, AUTH required) and
    "legacy" (STARTTLS offered, AUTH optional for 127.0.0.0/8).  C{host},
    C{port}, C{password} and C{timeout} replace what the upstream gives.
    """
    count = [0]

    def build(server: Upstream, *, host: str | None = None, port: int | None = None,
              password: str | None = None, timeout: int = 20) -> str:
        count[0] += 1
        password_file = tmp_path / f"upstream-password-{count[0]}"
        password_file.write_text((server.password if password is None else password) + "\n",
                                 encoding="utf-8")
        return front_toml(certificate, users_file, hostname=HELO_NAME) + f"""
[upstream]
host = "{server.host if host is None else host}"
port = {server.port if port is None else port}
tls = "{server.tls}"
ca_certificates = "{server.ca_file}"
timeout = {timeout}

[credentials]
username = "{server.username}"
password_file = "{password_file}"
"""

    return build


@pytest.fixture
def relay(reactor: Any, relay_toml: Callable[..., str], tmp_path: Any) -> Iterator[Relay]:
    """Starts bridges relaying to an upstream (options as for C{relay_toml}); stops them after."""
    running: list[RunningBridge] = []

    def start(server: Upstream, **changes: Any) -> RunningBridge:
        directory = tmp_path / f"bridge-{len(running)}"
        directory.mkdir()
        running.append(start_bridge(reactor, relay_toml(server, **changes), str(directory)))
        return running[-1]

    yield start
    for bridge in running:
        stop_bridge(reactor, bridge)


# Helpers.

def smtps(bridge: RunningBridge, certificate: tuple[str, str],
          timeout: float = 30) -> smtplib.SMTP_SSL:
    """smtplib over the implicit-TLS listener, logged in."""
    client = smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                              context=client_context(certificate), timeout=timeout)
    client.login(USER, PASSWORD)
    return client


def raw_smtps(bridge: RunningBridge, certificate: tuple[str, str]) -> RawClient:
    """A raw client over the implicit-TLS listener, greeted, EHLO said, logged in."""
    client = RawClient(bridge.ports["smtps"])
    client.sock = client_context(certificate).wrap_socket(client.sock,
                                                          server_hostname="localhost")
    assert client.code() == "220"
    client.send(b"EHLO raw.example\r\n")
    assert client.code() == "250"
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    client.send(f"AUTH PLAIN {plain}\r\n".encode())
    assert client.code() == "235"
    return client


def reply_to_mail(bridge: RunningBridge) -> list[str]:
    """The reply lines to MAIL FROM of a trusted client on the legacy listener."""
    client = RawClient(bridge.ports["legacy"])
    try:
        assert client.code() == "220"
        client.send(b"EHLO device.example\r\n")
        assert client.code() == "250"
        client.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
        lines = client.reply()
        client.send(b"QUIT\r\n")
        assert client.code() == "221"
        return lines
    finally:
        client.close()


def replies_until_closed(client: RawClient) -> list[list[str]]:
    """Every reply the bridge still sends, until it closes the connection."""
    replies = []
    while True:
        try:
            replies.append(client.reply())
        except ConnectionError:
            client.close()
            return replies




BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# 1. Message integrity.

@pytest.mark.parametrize("size", [1, 1 << 20, pytest.param(20 << 20, marks=pytest.mark.slow)],
                         ids=["1B", "1MiB", "20MiB"])
def test_stored_bytes_equal_sent_bytes(relay: Relay, upstream: Upstream,
                                       certificate: tuple[str, str], size: int) -> None:
    bridge = relay(upstream)
    message = make_message(size, seed=size)
    if size > 1:
        lines = message.split(b"\r\n")
        assert b"." in lines and any(line.startswith(b".") and line != b"." for line in lines)
        assert any(byte >= 0x80 for byte in message)
    with smtps(bridge, certificate, timeout=120) as client:
        assert client.sendmail(SENDER, [RECIPIENT], message,
                               mail_options=["BODY=8BITMIME"]) == {}
    [stored] = upstream.stored()
    assert sha(stored.sent) == sha(on_the_wire(message))
    assert (stored.sender, stored.recipients) == (SENDER, [RECIPIENT])
    # smtplib gives SIZE itself, since the bridge advertises it.
    assert sorted(stored.mail_options) == ["BODY=8BITMIME", f"SIZE={len(message)}"]


# 2. Bare LF from a legacy device.

def test_bare_lf_lines_are_stored_with_crlf(relay: Relay, upstream: Upstream) -> None:
    bridge = relay(upstream)
    client = RawClient(bridge.ports["legacy"])
    assert client.code() == "220"
    client.send(f"EHLO device.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n"
                "DATA\r\n".encode())
    assert [client.code() for _ in range(4)] == ["250", "250", "250", "354"]
    client.send(b"Subject: bare LF\nX-Device: scanner\n\nfirst line\n..dotted line\n"
                b"8-bit \xe9\xff\nlast line\r\n.\r\n")
    assert client.reply() == ["250 2.0.0 OK queued"]
    client.send(b"QUIT\r\n")
    assert client.code() == "221"
    client.close()
    [stored] = upstream.stored()
    assert stored.sent == (b"Subject: bare LF\r\nX-Device: scanner\r\n\r\nfirst line\r\n"
                              b".dotted line\r\n8-bit \xe9\xff\r\nlast line\r\n")
    # No parameters given, none passed on.
    assert stored.mail_options == []
    sent = upstream.under_tls()
    assert b"\r\n..dotted line\r\n" in sent
    assert BARE_CR_OR_LF.search(sent) is None


# 3. A recipient refused upstream.

def test_recipient_refused_upstream(relay: Relay, upstream_factory: Start,
                                    certificate: tuple[str, str]) -> None:
    server = upstream_factory(reject_recipients={"nobody@example.com": "550 5.1.1 No such user"})
    bridge = relay(server)
    recipients = ["one@example.com", "nobody@example.com", "two@example.com"]
    with smtps(bridge, certificate) as client:
        refused = client.sendmail(SENDER, recipients, b"Subject: partly\r\n\r\nhi\r\n")
    assert refused == {"nobody@example.com": (550, b"5.1.1 No such user")}
    [stored] = server.stored()
    assert stored.recipients == ["one@example.com", "two@example.com"]
    assert stored.sent == b"Subject: partly\r\n\r\nhi\r\n"


def test_recipient_refusal_on_the_wire(relay: Relay, upstream_factory: Start) -> None:
    server = upstream_factory(reject_recipients={"nobody@example.com": "550 5.1.1 No such user"})
    bridge = relay(server)
    client = RawClient(bridge.ports["legacy"])
    client.reply()
    client.send(f"EHLO device.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<one@example.com>\r\n"
                "RCPT TO:<nobody@example.com>\r\nRCPT TO:<two@example.com>\r\n".encode())
    replies = [client.reply() for _ in range(5)]
    assert replies[2:] == [["250 2.1.5 OK"], ["550 5.1.1 No such user"], ["250 2.1.5 OK"]]
    client.send(b"QUIT\r\n")
    assert client.code() == "221"
    client.close()


# 4. The upstream's verdict on the message.

def test_failure_at_end_of_data_is_passed_on(relay: Relay, upstream_factory: Start,
                                             certificate: tuple[str, str]) -> None:
    server = upstream_factory(data_reply="451 4.3.0 Upstream busy, try again later")
    bridge = relay(server)
    with smtps(bridge, certificate) as client:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.sendmail(SENDER, [RECIPIENT], b"Subject: later\r\n\r\nhi\r\n")
    assert (caught.value.smtp_code, caught.value.smtp_error) == (
        451, b"4.3.0 Upstream busy, try again later")
    assert server.stored() == []


# 5-8, 12. Upstream failures: a 4xx at MAIL FROM that says which.

def test_upstream_down(relay: Relay, upstream: Upstream) -> None:
    port = closed_port()
    bridge = relay(upstream, host="127.0.0.1", port=port)
    [line] = reply_to_mail(bridge)
    assert line.startswith("451 4.4.1 ")
    assert f"127.0.0.1:{port}" in line and "unreachable" in line


def test_certificate_for_another_host(relay: Relay, upstream_factory: Start) -> None:
    server = upstream_factory(certificate_names=["wrong.example"])
    bridge = relay(server)
    [line] = reply_to_mail(bridge)
    assert line.startswith("454 4.7.5 ")
    assert f"localhost:{server.port}" in line and "host localhost" in line
    time.sleep(0.2)
    assert server.clear_text() == f"EHLO {HELO_NAME}\r\nSTARTTLS\r\n".encode()
    assert server.under_tls() == b""
    assert server.logins == [] and server.stored() == []


def test_upstream_without_starttls(relay: Relay, upstream_factory: Start) -> None:
    server = upstream_factory(starttls=False)
    bridge = relay(server)
    [line] = reply_to_mail(bridge)
    assert line.startswith("454 4.7.0 ")
    assert f"localhost:{server.port}" in line and "does not offer STARTTLS" in line
    time.sleep(0.2)
    assert server.clear_text() == f"EHLO {HELO_NAME}\r\n".encode()
    assert server.logins == [] and server.stored() == []


def test_wrong_upstream_password(relay: Relay, upstream: Upstream,
                                 logged: list[str]) -> None:
    wrong = "Wrong-upstream-Pass-4"
    bridge = relay(upstream, password=wrong)
    [line] = reply_to_mail(bridge)
    assert line.startswith("454 4.7.0 ")
    assert upstream.username in line and "rejected the login" in line
    assert upstream.logins == [("PLAIN", upstream.username, False)]
    secrets = [wrong, base64.b64encode(wrong.encode()).decode(),
               base64.b64encode(f"\0{upstream.username}\0{wrong}".encode()).decode()]
    assert not any(secret in line for secret in secrets)
    assert any("rejected the login" in text for text in logged), "the observer saw nothing"
    leaks = [text for text in logged for secret in secrets if secret in text]
    assert leaks == []


def test_upstream_that_never_answers(relay: Relay, upstream: Upstream) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    silent.settimeout(0.1)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                held.append(silent.accept()[0])
            except TimeoutError:
                pass

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = silent.getsockname()[1]
    try:
        bridge = relay(upstream, host="127.0.0.1", port=port, timeout=1)
        started = time.monotonic()
        [line] = reply_to_mail(bridge)
        assert time.monotonic() - started < 8
        assert line.startswith("451 4.4.2 ")
        assert f"127.0.0.1:{port}" in line and "timed out" in line
        assert held, "the bridge never connected"
    finally:
        done.set()
        acceptor.join(5)
        silent.close()
        for connection in held:
            connection.close()


# 9. The client leaves in the middle of DATA.

def test_client_gone_mid_data(relay: Relay, upstream: Upstream,
                              certificate: tuple[str, str]) -> None:
    bridge = relay(upstream)
    client = RawClient(bridge.ports["legacy"])
    client.reply()
    client.send(f"EHLO device.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n"
                "DATA\r\n".encode())
    assert [client.code() for _ in range(4)] == ["250", "250", "250", "354"]
    client.send(b"Subject: half\r\n\r\n" + b"x" * 5000 + b"\r\nthe first half\r\n")
    wait_for(lambda: b"the first half\r\n" in upstream.under_tls())
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    time.sleep(0.5)
    assert upstream.stored() == []
    sent = upstream.under_tls()
    assert b"\r\n.\r\n" not in sent
    assert sent.endswith(b"the first half\r\n")
    # The bridge goes on serving.
    with smtps(bridge, certificate) as again:
        assert again.sendmail(SENDER, [RECIPIENT], b"Subject: whole\r\n\r\nhi\r\n") == {}
    assert [message.sent for message in upstream.stored()] == [
        b"Subject: whole\r\n\r\nhi\r\n"]


# 10. SMTP smuggling.

@pytest.mark.parametrize("vector", [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r.\n"],
                         ids=["LF.LF", "CR.CR", "CRLF.CR", "LF.CRLF", "CR.LF"])
def test_smuggling_is_impossible(relay: Relay, upstream: Upstream,
                                 certificate: tuple[str, str], vector: bytes) -> None:
    bridge = relay(upstream)
    client = raw_smtps(bridge, certificate)
    client.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    assert client.code() == "250"
    client.send(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
    assert client.code() == "250"
    client.send(b"DATA\r\n")
    assert client.code() == "354"
    client.send(b"Subject: smuggle\r\n\r\nfirst part" + vector
                + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
                  b"Subject: spoofed\r\n\r\nsecond message\r\n" + b"\r\n.\r\n")
    client.send(b"QUIT\r\n")
    replies = replies_until_closed(client)
    assert [(message.sender, message.recipients) for message in upstream.stored()] == [
        (SENDER, [RECIPIENT])]
    [stored] = upstream.stored()
    assert [reply[0][:3] for reply in replies] == ["250", "221"]
    assert b"second message" in stored.sent
    sent = upstream.under_tls()
    assert BARE_CR_OR_LF.search(sent) is None
    mails = [line for line in commands(sent) if line.upper().startswith(b"MAIL")]
    assert mails == [f"MAIL FROM:<{SENDER}>".encode()]


# 11. swaks.

swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")


def run_swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(port),
                           "--from", SENDER, "--to", RECIPIENT,
                           "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
                           "--header", "Subject: swaks relay", "--body", "from swaks",
                           *args], capture_output=True, text=True, timeout=60)


@swaks
@pytest.mark.parametrize(("listener", "option"), [("smtps", "--tls-on-connect"),
                                                  ("legacy", "-tls")])
def test_swaks(relay: Relay, upstream: Upstream, listener: str, option: str) -> None:
    bridge = relay(upstream)
    result = run_swaks(bridge.ports[listener], option)
    assert result.returncode == 0, result.stdout + result.stderr
    [stored] = upstream.stored()
    assert (stored.sender, stored.recipients) == (SENDER, [RECIPIENT])
    assert b"Subject: swaks relay\r\n" in stored.sent and b"from swaks" in stored.sent
    assert upstream.logins == [("PLAIN", upstream.username, True)]

