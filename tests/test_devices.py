"""Devices, round two: real client programs against the running bridge, for what its log
says about failed handshakes and refusals, for clients that skip HELO or know only DHE,
and for stunnel in front of a plain listener where the bridge cannot serve a device.

One bridge serves the module, relaying to an aiosmtpd upstream (L{tests.upstream}),
with these listeners on loopback:

- "smtps": implicit TLS from TLS 1.2 (the default floor), AUTH required;
- "modern2525": STARTTLS from TLS 1.2, AUTH optional for 127.0.0.0/8;
- "legacy465": implicit TLS from TLS 1.0, AUTH required;
- "legacy2525": STARTTLS from TLS 1.0, AUTH optional for 127.0.0.0/8;
- "strict": implicit TLS from TLS 1.0 with require_helo;
- "stunnel": no TLS, PROXY protocol, AUTH required in clear text: the plain listener the
  README puts behind stunnel.

Handshakes must end within 3 s and a client may idle 4 s, so that timeouts come quickly;
messages may be 100 kB.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import attr
import pytest
from twisted.logger import formatEvent, globalLogPublisher

from smtpbridge.handshake import PLAIN_TEXT, TIMEOUT
from tests.client_hellos import TLS1_AES128
from tests.conftest import PASSWORD, USER, RunningBridge, start_bridge, stop_bridge
from tests.test_compat import (
    CLIENT_TIMEOUT,
    LEGACY_CIPHERS,
    PLAIN,
    RECIPIENT,
    SENDER,
    SClient,
    body,
    curl,
    openssl,
    run_client,
    s_client,
    stuffed,
    swaks,
    swaks_command,
    trace_header,
    write_message,
)
from tests.test_loopback import RawClient
from tests.upstream import StoredMessage, Upstream, start_upstream

MAX_MESSAGE_SIZE = 102_400
IDLE_TIMEOUT = 4
HANDSHAKE_TIMEOUT = 3

bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


@attr.define
class BridgeLog:
    """Every log event of the module's bridge (and anything else that logs meanwhile)."""

    events: list[dict[str, Any]] = attr.Factory(list)

    def observe(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def mark(self) -> int:
        return len(self.events)

    def lines(self, since: int = 0) -> list[str]:
        return [formatEvent(event) for event in self.events[since:]]

    def wait_for(self, pattern: str, since: int, timeout: float = 15) -> re.Match[str]:
        """The first line logged after C{since} that matches C{pattern}."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines(since):
                found = re.search(pattern, line)
                if found:
                    return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in:\n" + "\n".join(self.lines(since)))
            time.sleep(0.05)

    def session_lines(self, session: str, since: int = 0) -> list[str]:
        return [line for line in self.lines(since) if line.startswith(session + " ")]


@attr.define
class Devices:
    bridge: RunningBridge
    upstream: Upstream
    certificate: tuple[str, str]
    log: BridgeLog

    def port(self, listener: str) -> int:
        return self.bridge.ports[listener]

    @property
    def ca_file(self) -> str:
        return self.certificate[0]

    def count(self) -> int:
        return len(self.upstream.stored())

    def delivered(self, before: int) -> StoredMessage:
        stored = self.upstream.stored()
        assert len(stored) == before + 1, [m.sent[:80] for m in stored[before:]]
        return stored[-1]

    def handshake_failures(self) -> dict[tuple[str, str], int]:
        """The bridge's count of failed handshakes by listener and reason."""
        for child in self.bridge.service:  # type: ignore[attr-defined]
            factory = getattr(child, "factory", None)
            factory = getattr(factory, "wrappedFactory", factory)
            if hasattr(factory, "handshake_failures"):
                return dict(factory.handshake_failures.counts)
        raise AssertionError("no listener counts handshake failures")


def devices_toml(certificate: tuple[str, str], users_file: str, upstream: Upstream,
                 password_file: str) -> str:
    cert, key = certificate
    listeners = [("smtps", "implicit", "1.2", "required", ""),
                 ("modern2525", "starttls", "1.2", "optional", ""),
                 ("legacy465", "implicit", "1.0", "required", ""),
                 ("legacy2525", "starttls", "1.0", "optional", ""),
                 ("strict", "implicit", "1.0", "required", "require_helo = true\n")]
    text = f"""
[server]
hostname = "localhost"
max_message_size = {MAX_MESSAGE_SIZE}
idle_timeout = {IDLE_TIMEOUT}
handshake_timeout = {HANDSHAKE_TIMEOUT}

[tls]
certificate = "{cert}"
key = "{key}"
"""
    for name, tls, version, auth, extra in listeners:
        text += f"""
[[listener]]
name = "{name}"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "{tls}"
min_tls_version = "{version}"
auth = "{auth}"
{extra}"""
    return text + f"""
[[listener]]
name = "stunnel"
endpoint = "haproxy:tcp:0:interface=127.0.0.1"
tls = "none"
auth = "required"
allow_plaintext_auth = true

[access]
trusted_networks = ["127.0.0.0/8"]
users_file = "{users_file}"

{upstream.tables(password_file)}"""


@pytest.fixture(scope="module")
def devices(reactor: Any, certificate: tuple[str, str], users_file: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devices]:
    directory = tmp_path_factory.mktemp("devices")
    upstream = start_upstream(str(directory / "upstream"))
    password_file = directory / "upstream-password"
    password_file.write_text(upstream.password + "\n", encoding="utf-8")
    log = BridgeLog()
    globalLogPublisher.addObserver(log.observe)
    try:
        bridge = start_bridge(reactor, devices_toml(certificate, users_file, upstream,
                                                    str(password_file)), str(directory))
        try:
            yield Devices(bridge, upstream, certificate, log)
        finally:
            stop_bridge(reactor, bridge)
    finally:
        globalLogPublisher.removeObserver(log.observe)
        upstream.stop()


def failure_line(devices: Devices, listener: str, since: int) -> str:
    """The "TLS handshake failed" line of a session on C{listener} after C{since}."""
    return devices.log.wait_for(rf"^\w{{12}} TLS handshake failed from \[127\.0\.0\.1\] on "
                                rf"listener {listener}: .*", since)[0]


def session_of(line: str) -> str:
    return line.split(" ", 1)[0]


# 1. A failed handshake says why, what the client offered, and what would serve it.

@openssl
def test_tls_1_0_against_the_1_2_floor_is_explained(devices: Devices) -> None:
    since, before = devices.log.mark(), devices.handshake_failures()
    result = subprocess.run(
        s_client(devices.port("smtps"), devices.ca_file, "-tls1", "-cipher", LEGACY_CIPHERS),
        input=b"EHLO printer.example\r\n", capture_output=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode != 0
    line = failure_line(devices, "smtps", since)
    assert ": unsupported protocol; client offered TLS 1.0 at most, 8 cipher suites " in line
    assert line.endswith('; hint: client offered at most TLS 1.0: set min_tls_version = "1.0" '
                         'on listener "smtps"'), line
    session = session_of(line)
    assert any("connect from [127.0.0.1]" in text
               for text in devices.log.session_lines(session, since))
    after = devices.handshake_failures()
    key = ("smtps", "unsupported protocol")
    assert after.get(key, 0) == before.get(key, 0) + 1


@openssl
def test_tls_1_0_after_starttls_against_the_1_2_floor_is_explained(devices: Devices) -> None:
    """The same client on a STARTTLS listener: what it sent after the switch is read."""
    since = devices.log.mark()
    result = subprocess.run(
        s_client(devices.port("modern2525"), devices.ca_file, "-starttls", "smtp", "-tls1",
                 "-cipher", LEGACY_CIPHERS),
        input=b"", capture_output=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode != 0
    line = failure_line(devices, "modern2525", since)
    assert "client offered TLS 1.0 at most" in line
    assert 'set min_tls_version = "1.0" on listener "modern2525"' in line


@bash
def test_plain_text_on_the_implicit_tls_port_is_explained(devices: Devices) -> None:
    """A script that talks SMTP without waiting for the greeting, as `printf | nc` does,
    on the implicit-TLS port."""
    since, before = devices.log.mark(), devices.handshake_failures()
    script = (f"exec 3<>/dev/tcp/127.0.0.1/{devices.port('smtps')}; "
              "printf 'EHLO printer.example\\r\\n' >&3; cat <&3 >/dev/null")
    subprocess.run(["bash", "-c", script], capture_output=True, timeout=CLIENT_TIMEOUT)
    line = failure_line(devices, "smtps", since)
    assert line.endswith('; client sent "EHLO" in clear text; hint: client sent "EHLO" in '
                         "clear text on an implicit-TLS listener: use the STARTTLS listener")
    key = ("smtps", PLAIN_TEXT)
    assert devices.handshake_failures().get(key, 0) == before.get(key, 0) + 1


@swaks
def test_a_plain_client_waiting_for_the_greeting_is_explained(devices: Devices) -> None:
    """swaks without TLS on the implicit-TLS port waits for a greeting that never comes."""
    since = devices.log.mark()
    began = time.monotonic()
    result = run_client(swaks_command(devices.port("smtps"), "--timeout", "20"))
    assert result.returncode != 0
    assert time.monotonic() - began < 15
    line = failure_line(devices, "smtps", since)
    assert f": {TIMEOUT} ({HANDSHAKE_TIMEOUT} s); client sent nothing; hint: a plain-text " \
           "SMTP client waits for a greeting, which an implicit-TLS listener never sends: " \
           "use the STARTTLS listener" in line, line


def test_a_3des_only_client_is_told_what_cannot_be_served(devices: Devices) -> None:
    """A TLS 1.0 ClientHello offering only DES-CBC3-SHA: the hello of
    ``openssl s_client -tls1 -cipher AES128-SHA`` with its one suite changed, since no
    OpenSSL at hand can offer 3DES any more."""
    hello = TLS1_AES128.replace(b"\x00\x04\x00\x2f\x00\xff", b"\x00\x04\x00\x0a\x00\xff", 1)
    assert hello != TLS1_AES128
    since = devices.log.mark()
    with socket.create_connection(("127.0.0.1", devices.port("legacy465")), timeout=10) as sock:
        sock.sendall(hello)
        assert sock.recv(100)[:1] == b"\x15"  # a TLS alert
    line = failure_line(devices, "legacy465", since)
    assert ": no shared cipher; client offered TLS 1.0 at most, 1 cipher suite: " \
           "DES-CBC3-SHA; hint: none of the client's cipher suites is in the bridge's " \
           "OpenSSL: see the README on 3DES-only devices" in line, line


@openssl
def test_a_client_that_refuses_the_certificate_is_explained(devices: Devices) -> None:
    """s_client without the bridge's CA, verifying: it ends the handshake with an alert."""
    since = devices.log.mark()
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{devices.port('smtps')}", "-brief",
         "-verify_return_error", "-no-CAfile", "-no-CApath", "-no-CAstore"],
        input=b"", capture_output=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode != 0
    line = failure_line(devices, "smtps", since)
    assert "alert unknown ca; client offered TLS 1.3 at most" in line, line
    assert line.endswith("hint: the client refused the bridge's certificate: the device must "
                         "trust its issuer and find in it the name or address it connects to "
                         "(it sent no server name, so it may connect by IP address)"), line


def test_a_port_check_is_not_a_failed_handshake(devices: Devices) -> None:
    """A monitor that connects and closes sends nothing: no failure is logged or counted."""
    since, before = devices.log.mark(), devices.handshake_failures()
    with socket.create_connection(("127.0.0.1", devices.port("smtps")), timeout=10):
        pass
    devices.log.wait_for(r"disconnect from \[127\.0\.0\.1\]", since)
    assert not any("TLS handshake failed" in line for line in devices.log.lines(since))
    assert devices.handshake_failures() == before


@openssl
def test_sha1_signatures_only_are_explained_then_served_from_1_1(devices: Devices) -> None:
    """A TLS 1.2 stack that signs only with SHA-1 (Java 7 and embedded stacks of its time)."""
    options = ["-tls1_2", "-sigalgs", "RSA+SHA1", "-cipher", LEGACY_CIPHERS]
    since = devices.log.mark()
    refused = subprocess.run(s_client(devices.port("smtps"), devices.ca_file, *options),
                             input=b"", capture_output=True, timeout=CLIENT_TIMEOUT)
    assert refused.returncode != 0
    line = failure_line(devices, "smtps", since)
    assert ": no shared signature algorithms; client offered TLS 1.2 at most" in line, line
    assert ", SHA-1 signatures only; hint: client accepts only SHA-1 signatures: set " \
           'min_tls_version = "1.1" on listener "smtps", which allows them' in line, line
    result, message, before = pipelined(devices, "legacy465", options, "sha1-signatures")
    assert "Protocol version: TLSv1.2\n" in result.stderr.decode(), result.stderr
    assert devices.delivered(before).sent == message


# Sending through s_client.

def pipelined(devices: Devices, listener: str, options: list[str], tag: str,
              greeting: bytes = b"EHLO legacy-device.example\r\n",
              ) -> tuple[subprocess.CompletedProcess[bytes], bytes, int]:
    """A message sent through openssl s_client in one write, as a pipelining device does:
    the result (which must succeed), the message and the upstream's count before."""
    before = devices.count()
    message = body(tag)
    script = (greeting + f"AUTH PLAIN {PLAIN}\r\nMAIL FROM:<{SENDER}>\r\n"
              f"RCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode() + stuffed(message) + b".\r\nQUIT\r\n")
    result = subprocess.run(s_client(devices.port(listener), devices.ca_file, *options),
                            input=script, capture_output=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    codes = [line[:3] for line in result.stdout.decode().split("\r\n") if line[3:4] == " "]
    assert codes[-5:] == ["250", "250", "354", "250", "221"], result.stdout
    return result, message, before


# 2. MAIL and AUTH without HELO: accepted, recorded; refused with require_helo.

@openssl
def test_a_device_that_never_says_helo(devices: Devices) -> None:
    """AUTH first, then the transaction, all in one write: no HELO or EHLO at all."""
    since = devices.log.mark()
    _, message, before = pipelined(devices, "legacy465", ["-tls1_2"], "no-helo", greeting=b"")
    stored = devices.delivered(before)
    assert stored.sent == message
    header = trace_header(stored)
    assert header.startswith(b"Received: from [127.0.0.1] (no HELO) by localhost"), header
    assert b"with SMTPSA (TLSv1.2 " in header
    devices.log.wait_for(r"^\w{12} AUTH without HELO/EHLO: accepted$", since)


@openssl
def test_require_helo_refuses_mail_and_auth_before_helo(devices: Devices) -> None:
    since, before = devices.log.mark(), devices.count()
    client = SClient(s_client(devices.port("strict"), devices.ca_file))
    assert client.code() == "220"
    client.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    assert client.reply() == ["503 5.5.1 Error: send HELO/EHLO first"]
    client.send(f"AUTH PLAIN {PLAIN}\r\n".encode())
    assert client.reply() == ["503 5.5.1 Error: send HELO/EHLO first"]
    client.send(b"EHLO strict-device.example\r\n")
    assert client.code() == "250"
    client.send(f"AUTH PLAIN {PLAIN}\r\n".encode())
    assert client.code() == "235"
    client.send(b"QUIT\r\n")
    assert client.code() == "221"
    assert client.finish()[0] == 0
    devices.log.wait_for(r"^\w{12} MAIL refused: no HELO/EHLO yet \(require_helo on listener "
                         r"strict\)$", since)
    devices.log.wait_for(r"^\w{12} AUTH refused: no HELO/EHLO yet", since)
    assert devices.count() == before


# 3. DHE-only clients.

@openssl
@pytest.mark.parametrize(("listener", "version", "flag"), [
    ("legacy465", "TLSv1", "-tls1"), ("smtps", "TLSv1.2", "-tls1_2")])
def test_dhe_only_client(devices: Devices, listener: str, version: str, flag: str) -> None:
    since = devices.log.mark()
    result, message, before = pipelined(
        devices, listener, [flag, "-cipher", "DHE-RSA-AES128-SHA:@SECLEVEL=0"], f"dhe-{version}")
    said = result.stderr.decode()
    assert f"Protocol version: {version}\n" in said and "Ciphersuite: DHE-RSA-AES128-SHA\n" \
        in said, said
    assert "Server Temp Key: DH, 2048 bits" in said  # the ffdhe2048 group
    assert devices.delivered(before).sent == message
    devices.log.wait_for(rf"TLS established: {re.escape(version)} DHE-RSA-AES128-SHA$", since)


# 4. What the bridge cannot serve: stunnel in front for 3DES; devices that connect by address.

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def system_openssl_has(cipher: str) -> bool:
    """Whether the system's OpenSSL (the one stunnel uses) knows C{cipher}."""
    if shutil.which("openssl") is None:
        return False
    return subprocess.run(["openssl", "ciphers", f"{cipher}:@SECLEVEL=0"],
                          capture_output=True, timeout=30).returncode == 0


def readme_stunnel_config() -> str:
    """The stunnel configuration the README gives for 3DES-only devices."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return text.split("<!-- stunnel-config -->\n```ini\n", 1)[1].split("```", 1)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def replaced(text: str, old: str, new: str) -> str:
    assert old in text, f"the README's stunnel configuration has no {old!r}"
    return text.replace(old, new)


@pytest.fixture(scope="module")
def stunnel_port(devices: Devices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """stunnel running the README's configuration, with the test's ports and certificate."""
    if STUNNEL is None:
        pytest.skip("stunnel is not installed (apt-get install stunnel4)")
    port = free_port()
    config = readme_stunnel_config()
    config = replaced(config, "accept = 465\n", f"accept = 127.0.0.1:{port}\n")
    config = replaced(config, "connect = 127.0.0.1:2465\n",
                      f"connect = 127.0.0.1:{devices.port('stunnel')}\n")
    config = replaced(config, "/etc/smtpbridge/fullchain.pem", devices.certificate[0])
    config = replaced(config, "/etc/smtpbridge/privkey.pem", devices.certificate[1])
    path = tmp_path_factory.mktemp("stunnel") / "smtpbridge.conf"
    path.write_text("foreground = yes\npid =\n" + config, encoding="utf-8")
    process = subprocess.Popen([STUNNEL, str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = process.stdout.read() if process.stdout else b""
                    raise AssertionError(f"stunnel did not start: {output.decode()}")
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(10)


@openssl
@pytest.mark.parametrize("cipher", [
    "AES128-SHA",
    pytest.param("DES-CBC3-SHA", marks=pytest.mark.skipif(
        not system_openssl_has("DES-CBC3-SHA"),
        reason="the system's OpenSSL has no 3DES suites (built without "
               "enable-weak-ssl-ciphers), so neither stunnel nor s_client can use them")),
])
def test_stunnel_in_front_of_a_plain_listener(devices: Devices, stunnel_port: int,
                                              cipher: str) -> None:
    """A TLS 1.0 device through stunnel, which passes its address on (PROXY protocol) to
    a plain listener that takes AUTH in clear text on loopback only."""
    since, before = devices.log.mark(), devices.count()
    message = body(f"stunnel-{cipher}")
    script = (f"EHLO stunnel-device.example\r\nAUTH PLAIN {PLAIN}\r\nMAIL FROM:<{SENDER}>\r\n"
              f"RCPT TO:<{RECIPIENT}>\r\nDATA\r\n").encode() + stuffed(message) + b".\r\nQUIT\r\n"
    result = subprocess.run(
        s_client(stunnel_port, devices.ca_file, "-tls1", "-cipher", f"{cipher}:@SECLEVEL=0"),
        input=script, capture_output=True, timeout=CLIENT_TIMEOUT)
    said = result.stderr.decode(errors="replace")
    assert result.returncode == 0, said
    assert "Protocol version: TLSv1\n" in said and f"Ciphersuite: {cipher}\n" in said, said
    stored = devices.delivered(before)
    assert stored.sent == message
    assert b"(smtpbridge, listener stunnel) with ESMTPA id" in trace_header(stored)
    devices.log.wait_for(r"connect from \[127\.0\.0\.1\]:\d+ on listener stunnel$", since)


@curl
@openssl
def test_a_device_connecting_by_address_verifies_the_self_signed_certificate(
        reactor: Any, users_file: str, tmp_path: Any) -> None:
    """[tls] self_signed_names puts an address into the certificate the bridge makes; curl
    connecting by that address verifies it, s_client checking another address does not."""
    cert, key = str(tmp_path / "tls" / "cert.pem"), str(tmp_path / "tls" / "key.pem")
    (tmp_path / "upstream-password").write_text("unused\n")
    toml = f"""
[server]
hostname = "bridge.example"

[tls]
certificate = "{cert}"
key = "{key}"
create_self_signed = true
self_signed_names = ["127.0.0.2", "printer-gateway.example"]

[[listener]]
name = "byaddress"
endpoint = "tcp:0:interface=127.0.0.2"
tls = "implicit"
auth = "optional"

[access]
users_file = "{users_file}"

[upstream]
host = "localhost"
port = 9

[credentials]
username = "relay@example.com"
password_file = "{tmp_path}/upstream-password"
"""
    bridge = start_bridge(reactor, toml, str(tmp_path))
    try:
        port = bridge.ports["byaddress"]
        result = run_client(["curl", "--silent", "--show-error", "--cacert", cert,
                             "--url", f"smtps://127.0.0.2:{port}", "--request", "HELP"])
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("214 "), result.stdout
        other = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.2:{port}", "-brief", "-CAfile", cert,
             "-verify_ip", "192.0.2.10", "-verify_return_error"],
            input=b"", capture_output=True, timeout=CLIENT_TIMEOUT)
        assert other.returncode != 0
        assert "IP address mismatch" in other.stderr.decode(errors="replace")
    finally:
        stop_bridge(reactor, bridge)


# 5. Refusals in the log, each with its session id.

@openssl
def test_a_cram_md5_device_is_refused_and_the_log_names_the_mechanism(devices: Devices) -> None:
    since = devices.log.mark()
    client = SClient(s_client(devices.port("legacy465"), devices.ca_file))
    assert client.code() == "220"
    client.send(b"EHLO cram-device.example\r\n")
    assert "250-AUTH PLAIN LOGIN" in client.reply()
    client.send(b"AUTH CRAM-MD5\r\n")
    assert client.reply() == ["504 5.5.4 Unrecognized authentication type"]
    client.send(b"QUIT\r\n")
    assert client.code() == "221"
    assert client.finish()[0] == 0
    devices.log.wait_for(r"^\w{12} AUTH refused: unknown mechanism CRAM-MD5; the bridge offers "
                         r"PLAIN LOGIN$", since)


@openssl
def test_auth_answered_with_the_next_command_is_logged(devices: Devices) -> None:
    """AUTH LOGIN and MAIL in one write: the MAIL line is taken as the user name."""
    since = devices.log.mark()
    client = SClient(s_client(devices.port("legacy465"), devices.ca_file))
    assert client.code() == "220"
    client.send(b"EHLO hasty-device.example\r\n")
    assert client.code() == "250"
    client.send(f"AUTH LOGIN\r\nMAIL FROM:<{SENDER}>\r\n".encode())
    assert client.reply() == ["334 VXNlcm5hbWU6"]
    assert client.reply() == ["501 5.5.2 Cannot decode AUTH response"]
    client.send(b"QUIT\r\n")
    assert client.code() == "221"
    assert client.finish()[0] == 0
    devices.log.wait_for(r"^\w{12} AUTH LOGIN: the answer to the challenge looks like a MAIL "
                         r"command; the client did not wait for the 334 reply$", since)


def test_auth_before_tls_is_logged(devices: Devices) -> None:
    """A device that logs in over plain text on a STARTTLS listener, never starting TLS."""
    since = devices.log.mark()
    client = RawClient(devices.port("legacy2525"))
    assert client.code() == "220"
    client.send(b"EHLO careless-device.example\r\n")
    assert "250 STARTTLS" in client.reply()
    client.send(f"AUTH PLAIN {PLAIN}\r\n".encode())
    assert client.code() == "538"
    client.send(b"QUIT\r\n")
    assert client.code() == "221"
    client.close()
    line = devices.log.wait_for(r"^\w{12} AUTH PLAIN refused: before TLS on listener "
                                r"legacy2525 \(the client must use STARTTLS first\)$", since)[0]
    assert PASSWORD not in "\n".join(devices.log.lines(since)) and PLAIN not in line


@swaks
def test_a_failed_login_names_the_mechanism(devices: Devices) -> None:
    since = devices.log.mark()
    result = run_client(swaks_command(
        devices.port("legacy465"), "--tls-on-connect", "--tls-verify",
        "--tls-ca-path", devices.ca_file, "--auth", "LOGIN", "--auth-user", USER,
        "--auth-password", "not-the-password"))
    assert result.returncode != 0 and "535 5.7.8" in result.stdout, result.stdout
    devices.log.wait_for(rf"^\w{{12}} AUTH failed for user '{USER}' from \[127\.0\.0\.1\] "
                         r"\(LOGIN\)$", since)
    assert "not-the-password" not in "\n".join(devices.log.lines(since))


@curl
def test_a_size_over_the_limit_is_logged(devices: Devices, tmp_path: Any) -> None:
    """curl declares the file's size with MAIL FROM's SIZE=."""
    since, before = devices.log.mark(), devices.count()
    message = b"Subject: a large scan\r\n\r\n" + b"x" * 76 * 2000 + b"\r\n"
    path = write_message(tmp_path, "large.eml", message)
    result = run_client(["curl", "--silent", "--show-error", "--url",
                         f"smtp://127.0.0.1:{devices.port('legacy2525')}/curl.example",
                         "--mail-from", SENDER, "--mail-rcpt", RECIPIENT, "--upload-file", path])
    assert result.returncode != 0 and "552" in result.stderr, result.stderr
    devices.log.wait_for(rf"^\w{{12}} MAIL refused: SIZE={len(message)} is over the limit of "
                         rf"{MAX_MESSAGE_SIZE} bytes$", since)
    assert devices.count() == before


@curl
def test_the_logged_size_is_what_the_client_sent(devices: Devices, tmp_path: Any) -> None:
    """A line of 3000 octets is folded on the way upstream; the log gives the size the
    client sent (curl's SIZE=), and what was relayed."""
    since, before = devices.log.mark(), devices.count()
    message = (b"Subject: one long line\r\n\r\n" + b"y" * 3000 + b"\r\n.leading dot\r\n"
               b"last line\r\n")
    path = write_message(tmp_path, "long.eml", message)
    result = run_client(["curl", "--silent", "--show-error", "--url",
                         f"smtp://127.0.0.1:{devices.port('legacy2525')}/curl.example",
                         "--mail-from", SENDER, "--mail-rcpt", RECIPIENT, "--upload-file", path])
    assert result.returncode == 0, result.stderr
    stored = devices.delivered(before)
    assert stored.mail_options == [f"SIZE={len(message)}"]
    assert len(stored.sent) > len(message)  # folded
    devices.log.wait_for(rf"^\w{{12}} status=sent .* size={len(message)} "
                         rf"relayed={len(stored.sent)} .*\(250 ", since)


@openssl
@pytest.mark.parametrize("phase", ["AUTH", "DATA"])
def test_the_idle_timeout_says_what_the_session_was_doing(devices: Devices, phase: str) -> None:
    since = devices.log.mark()
    client = SClient(s_client(devices.port("legacy465"), devices.ca_file))
    assert client.code() == "220"
    client.send(b"EHLO sleepy-device.example\r\n")
    assert client.code() == "250"
    if phase == "AUTH":
        client.send(b"AUTH LOGIN\r\n")
        assert client.code() == "334"
        expected = r"after AUTH"
    else:
        for command, code in ((f"AUTH PLAIN {PLAIN}", "235"), (f"MAIL FROM:<{SENDER}>", "250"),
                              (f"RCPT TO:<{RECIPIENT}>", "250"), ("DATA", "354")):
            client.send(command.encode() + b"\r\n")
            assert client.code() == code
        client.send(b"Subject: half a scan\r\n\r\nthe first")
        expected = r"after DATA \(33 bytes received\)"
    assert client.reply() == ["421 4.4.2 localhost Error: timeout exceeded"]
    client.finish()
    devices.log.wait_for(rf"^\w{{12}} idle timeout {expected}$", since)

