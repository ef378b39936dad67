"""The legacy-device compatibility matrix: real client programs against the bridge.

One bridge serves the whole module, relaying to an aiosmtpd upstream from
L{tests.upstream} (STARTTLS and AUTH required there), with four listeners on
loopback:

- "legacy465": implicit TLS from TLS 1.0 up, AUTH required;
- "legacy2525": STARTTLS offered, TLS 1.0 up, AUTH optional for 127.0.0.0/8;
- "modern465": implicit TLS from TLS 1.2 up, AUTH required;
- "lfdevice": no TLS, AUTH optional, a bare-LF "." ends DATA.

Each row drives one kind of old or odd client (openssl s_client as a device's
TLS stack, swaks, curl, smtplib, raw sockets where no program behaves that way)
and checks what the upstream stored against what the client sent, byte for
byte where the test chooses the bytes.  The TLS version that was negotiated is
read from the bridge's own log line and from its Received: header.
"""

from __future__ import annotations

import base64
import random
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import attr
import pytest
from twisted.logger import globalLogPublisher

from tests.conftest import PASSWORD, USER, RunningBridge, client_context, start_bridge, stop_bridge
from tests.test_loopback import RawClient, make_message, sha
from tests.upstream import StoredMessage, Upstream, start_upstream

SENDER = "scanner@example.com"
RECIPIENT = "office@example.com"
CLIENT_TIMEOUT = 60  # seconds a client program may take before it is killed
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()

openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                             reason="the openssl command is not installed")
swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


# The bridge and its upstream, one for the module.

@attr.define
class Matrix:
    """The running bridge, its upstream and the certificate clients check it against."""

    bridge: RunningBridge
    upstream: Upstream
    certificate: tuple[str, str]

    def port(self, listener: str) -> int:
        return self.bridge.ports[listener]

    @property
    def ca_file(self) -> str:
        return self.certificate[0]

    def count(self) -> int:
        return len(self.upstream.stored())

    def delivered(self, before: int) -> StoredMessage:
        """The one message stored since the upstream held C{before} messages."""
        stored = self.upstream.stored()
        assert len(stored) == before + 1, [m.sent[:80] for m in stored[before:]]
        return stored[-1]


def compat_toml(certificate: tuple[str, str], users_file: str, upstream: Upstream,
                password_file: str) -> str:
    cert, key = certificate
    return f"""
[server]
hostname = "localhost"

[tls]
certificate = "{cert}"
key = "{key}"

[[listener]]
name = "legacy465"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
min_tls_version = "1.0"
auth = "required"

[[listener]]
name = "legacy2525"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "starttls"
min_tls_version = "1.0"
auth = "optional"

[[listener]]
name = "modern465"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
min_tls_version = "1.2"

[[listener]]
name = "lfdevice"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
auth = "optional"
accept_bare_lf_end = true

[access]
trusted_networks = ["127.0.0.0/8"]
users_file = "{users_file}"

{upstream.tables(password_file)}"""


@pytest.fixture(scope="module")
def matrix(reactor: Any, certificate: tuple[str, str], users_file: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    directory = tmp_path_factory.mktemp("compat")
    upstream = start_upstream(str(directory / "upstream"))
    # aiosmtpd refuses more than 32 MiB by default; providers take the 25 MiB
    # attachments (about 34 MiB once in base64) that the curl row sends.
    upstream.controller.SMTP_kwargs["data_size_limit"] = 64 << 20
    password_file = directory / "upstream-password"
    password_file.write_text(upstream.password + "\n", encoding="utf-8")
    try:
        bridge = start_bridge(reactor, compat_toml(certificate, users_file, upstream,
                                                   str(password_file)), str(directory))
        try:
            yield Matrix(bridge, upstream, certificate)
        finally:
            stop_bridge(reactor, bridge)
    finally:
        upstream.stop()


@attr.define
class TLSLog:
    """The bridge's "connect ... on listener" and "TLS established: VERSION" log events."""

    listeners: dict[str, str] = attr.Factory(dict)  # session -> listener
    versions: dict[str, str] = attr.Factory(dict)  # session -> TLS version

    def observe(self, event: dict) -> None:
        session = event.get("session")
        text = event.get("log_format") or ""
        if session is None:
            return
        if " connect from " in text and "listener" in event:
            self.listeners[session] = event["listener"]
        elif "TLS established" in text:
            self.versions[session] = event["version"]

    def negotiated(self, listener: str) -> list[str]:
        """The TLS versions of the sessions on C{listener} so far, in no special order."""
        return [self.versions[s] for s, name in list(self.listeners.items())
                if name == listener and s in self.versions]


@pytest.fixture
def tls_log() -> Iterator[TLSLog]:
    log = TLSLog()
    globalLogPublisher.addObserver(log.observe)
    yield log
    globalLogPublisher.removeObserver(log.observe)


def trace_header(message: StoredMessage) -> bytes:
    """The Received: header the bridge put on top of a stored message (unfolded)."""
    header = message.content[:len(message.content) - len(message.sent)]
    return header.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")


def body(tag: str) -> bytes:
    """A small message whose Subject names the row, with lines that tempt clients and
    relays to misbehave: leading dots, lines starting with R and Q (s_client commands),
    trailing blanks, a line of the full 998 octets and empty lines before the end."""
    return (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: compat {tag}\r\n"
            "Message-ID: <" + tag + "@device.example>\r\n\r\n"
            "Regards from the scanner.\r\nQuarterly report attached.\r\n"
            ".leading dot\r\n..two dots\r\n.\r\ntrailing blanks \t \r\n"
            + "x" * 998 + "\r\nlast line\r\n\r\n\r\n").encode()


def stuffed(message: bytes) -> bytes:
    """C{message} dot-stuffed for DATA (it ends with CRLF)."""
    return b"\r\n".join(b"." + line if line.startswith(b".") else line
                        for line in message.split(b"\r\n"))


# openssl s_client as a device's TLS stack.

class SClient:
    """openssl s_client with the SMTP dialogue typed on its stdin, reply by reply.

    C{-ign_eof} keeps s_client from taking lines that start with "Q" or "R" as
    its own quit and renegotiate commands (and from leaving at the end of stdin).
    """

    def __init__(self, arguments: list[str]) -> None:
        self.arguments = arguments
        self.process = subprocess.Popen(arguments, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.timer = threading.Timer(CLIENT_TIMEOUT, self.process.kill)
        self.timer.start()

    def send(self, line: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line)
        self.process.stdin.flush()

    def reply(self) -> list[str]:
        assert self.process.stdout is not None
        lines = []
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise ConnectionError(f"s_client ended; got {lines!r}: {self.finish()[1]}")
            lines.append(line.rstrip(b"\r\n").decode())
            if line[3:4] != b"-":
                return lines

    def code(self) -> str:
        return self.reply()[-1][:3]

    def finish(self) -> tuple[int, str]:
        """Close stdin, wait for the end: the exit status and what s_client said on stderr."""
        assert self.process.stdin is not None and self.process.stderr is not None
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        status = self.process.wait(CLIENT_TIMEOUT)
        self.timer.cancel()
        return status, self.process.stderr.read().decode(errors="replace")


def s_client(port: int, ca_file: str, *options: str) -> list[str]:
    return ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief", "-ign_eof",
            "-CAfile", ca_file, "-verify_return_error", "-verify_ip", "127.0.0.1", *options]


# Which TLS version a client program pins, for each client.
OPENSSL_FLAGS = {"TLSv1": "-tls1", "TLSv1.1": "-tls1_1", "TLSv1.2": "-tls1_2",
                 "TLSv1.3": "-tls1_3"}
PYTHON_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
                   "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
SWAKS_PROTOCOLS = {"TLSv1.2": "tlsv1_2", "TLSv1.3": "tlsv1_3"}
LEGACY_CIPHERS = "DEFAULT@SECLEVEL=0"  # OpenSSL 3 clients refuse TLS 1.0/1.1 signatures above 0


# 1, 2. TLS 1.0 and 1.1, implicit and STARTTLS, through openssl s_client.

@openssl
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1"])
@pytest.mark.parametrize("listener", ["legacy465", "legacy2525"])
def test_openssl_legacy_tls(matrix: Matrix, tls_log: TLSLog, listener: str,
                            version: str) -> None:
    """A device that speaks only TLS 1.0 or 1.1 sends a message, typed command by command.

    RCPT and QUIT go lower-case, as some devices send them.
    """
    options = [OPENSSL_FLAGS[version], "-cipher", LEGACY_CIPHERS]
    if listener == "legacy2525":
        options += ["-starttls", "smtp"]
    before = matrix.count()
    message = body(f"openssl-{listener}-{version}")
    client = SClient(s_client(matrix.port(listener), matrix.ca_file, *options))
    if listener == "legacy465":
        assert client.code() == "220"  # with -starttls, s_client reads the greeting itself
    client.send(b"EHLO legacy-device.example\r\n")
    ehlo = client.reply()
    assert "250-AUTH PLAIN LOGIN" in ehlo and not any("STARTTLS" in line for line in ehlo)
    client.send(f"AUTH PLAIN {PLAIN}\r\n".encode())
    assert client.code() == "235"
    client.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    assert client.code() == "250"
    client.send(f"rcpt to:<{RECIPIENT}>\r\n".encode())
    assert client.code() == "250"
    client.send(b"DATA\r\n")
    assert client.code() == "354"
    client.send(stuffed(message) + b".\r\n")
    assert client.reply() == ["250 2.0.0 OK queued"]
    client.send(b"quit\r\n")
    assert client.code() == "221"
    status, said = client.finish()
    assert status == 0, said
    assert f"Protocol version: {version}\n" in said and "Verification: OK" in said, said
    stored = matrix.delivered(before)
    assert stored.sent == message
    assert (stored.sender, stored.recipients) == (SENDER, [RECIPIENT])
    assert tls_log.negotiated(listener) == [version]
    assert f"with ESMTPSA ({version} ".encode() in trace_header(stored)


@openssl
@pytest.mark.parametrize("options", [
    ["-cipher", "AES128-SHA:@SECLEVEL=0"],
    ["-cipher", "AES256-SHA:@SECLEVEL=0"],
    ["-cipher", "ECDHE-RSA-AES128-SHA:@SECLEVEL=0", "-curves", "P-256"],
], ids=["AES128-SHA", "AES256-SHA", "ECDHE-P-256"])
def test_openssl_tls_1_0_cipher_suites(matrix: Matrix, tls_log: TLSLog,
                                       options: list[str]) -> None:
    """TLS 1.0 stacks of old devices with a single suite: RSA key exchange (no forward
    secrecy) or ECDHE on P-256 only, all CBC with SHA-1."""
    before = matrix.count()
    message = body("cipher-" + options[1])
    script = (f"EHLO legacy-device.example\r\nAUTH PLAIN {PLAIN}\r\n"
              f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n").encode()
    # All of it at once, as a pipelining device would; upper-case RCPT and QUIT are safe
    # from s_client's command letters with -ign_eof.
    result = subprocess.run(
        s_client(matrix.port("legacy465"), matrix.ca_file, "-tls1", *options),
        input=script + stuffed(message) + b".\r\nQUIT\r\n", capture_output=True,
        timeout=CLIENT_TIMEOUT)
    said = result.stderr.decode(errors="replace")
    assert result.returncode == 0, said
    suite = options[1].partition(":")[0]
    assert "Protocol version: TLSv1\n" in said and f"Ciphersuite: {suite}\n" in said, said
    codes = [line[:4] for line in result.stdout.decode().split("\r\n") if line[3:4] == " "]
    assert codes == ["220 ", "250 ", "235 ", "250 ", "250 ", "354 ", "250 ", "221 "]
    assert matrix.delivered(before).sent == message
    assert tls_log.negotiated("legacy465") == ["TLSv1"]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_0_session_with_a_large_message_and_another(matrix: Matrix,
                                                          tls_log: TLSLog) -> None:
    """A few MiB over TLS 1.0 (CBC records), then a second message in the same session."""
    before = matrix.count()
    first = make_message(3 << 20, seed=10)
    second = body("tls1-second")
    context = python_context(matrix.ca_file, "TLSv1", "TLSv1")
    with smtplib.SMTP_SSL("127.0.0.1", matrix.port("legacy465"), context=context,
                          timeout=60) as client:
        assert client.sock.version() == "TLSv1"
        client.login(USER, PASSWORD)
        assert client.sendmail(SENDER, [RECIPIENT], first) == {}
        assert client.sendmail(SENDER, [RECIPIENT], second) == {}
    stored = matrix.upstream.stored()
    assert len(stored) == before + 2
    assert sha(stored[-2].sent) == sha(first) and stored[-1].sent == second
    assert tls_log.negotiated("legacy465") == ["TLSv1"]


# 3. TLS 1.0 and 1.1 refused where the floor is TLS 1.2.

@openssl
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1"])
def test_openssl_old_tls_refused_on_modern_listener(matrix: Matrix, tls_log: TLSLog,
                                                     version: str) -> None:
    """The handshake fails, and it is the bridge that says no: a protocol_version alert."""
    before = matrix.count()
    result = subprocess.run(
        s_client(matrix.port("modern465"), matrix.ca_file, OPENSSL_FLAGS[version],
                 "-cipher", LEGACY_CIPHERS),
        input=b"EHLO legacy-device.example\r\n", capture_output=True, timeout=CLIENT_TIMEOUT)
    said = result.stderr.decode(errors="replace")
    assert result.returncode != 0, said
    assert "alert protocol version" in said, said
    assert b"220 " not in result.stdout
    assert tls_log.negotiated("modern465") == []
    assert matrix.count() == before


def python_context(ca_file: str, minimum: str, maximum: str) -> ssl.SSLContext:
    """A Python client context that trusts the bridge, allowing C{minimum} to C{maximum}."""
    context = ssl.create_default_context(cafile=ca_file)
    if minimum in ("TLSv1", "TLSv1.1"):
        context.set_ciphers(LEGACY_CIPHERS)
    context.minimum_version = PYTHON_VERSIONS[minimum]
    context.maximum_version = PYTHON_VERSIONS[maximum]
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_python_tls_1_1_refused_on_modern_listener(matrix: Matrix, tls_log: TLSLog) -> None:
    """Python's ssl with TLS 1.1 at most: refused by modern465, accepted by legacy465."""
    context = python_context(matrix.ca_file, "TLSv1", "TLSv1.1")
    with pytest.raises(ssl.SSLError) as refused:
        smtplib.SMTP_SSL("127.0.0.1", matrix.port("modern465"), context=context, timeout=30)
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
    assert tls_log.negotiated("modern465") == []
    # The same client on the legacy listener: the better of its two versions.
    with smtplib.SMTP_SSL("127.0.0.1", matrix.port("legacy465"), context=context,
                          timeout=30) as client:
        assert client.sock.version() == "TLSv1.1"
        assert client.noop()[0] == 250
    assert tls_log.negotiated("legacy465") == ["TLSv1.1"]


# 4. TLS 1.2 and 1.3: swaks and smtplib pinned to each.

def swaks_command(port: int, *options: str) -> list[str]:
    return ["swaks", "--server", "127.0.0.1", "--port", str(port),
            "--from", SENDER, "--to", RECIPIENT, "--helo", "swaks-device.example", *options]


def run_client(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)


def write_message(directory: Any, name: str, message: bytes) -> str:
    path = directory / name
    path.write_bytes(message)
    return str(path)


def swaks_data(directory: Any, message: bytes) -> list[str]:
    """swaks options that send C{message} exactly: stuffed and ended here, not by swaks
    (which adds only the CRLF after the final dot)."""
    path = write_message(directory, "message.smtp", stuffed(message) + b".")
    return ["--data", "@" + path, "--no-data-fixup"]


@swaks
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("listener", ["modern465", "legacy465"])
def test_swaks_modern_tls(matrix: Matrix, tls_log: TLSLog, tmp_path: Any, listener: str,
                          version: str) -> None:
    before = matrix.count()
    message = body(f"swaks-{listener}-{version}")
    result = run_client(swaks_command(
        matrix.port(listener), "--tls-on-connect", "--tls-protocol", SWAKS_PROTOCOLS[version],
        "--tls-verify", "--tls-ca-path", matrix.ca_file,
        "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
        *swaks_data(tmp_path, message)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"TLS started with cipher {version}:" in result.stdout, result.stdout
    assert matrix.delivered(before).sent == message
    assert tls_log.negotiated(listener) == [version]


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("listener", ["modern465", "legacy465", "legacy2525"])
def test_smtplib_pinned_tls(matrix: Matrix, tls_log: TLSLog, listener: str,
                            version: str) -> None:
    before = matrix.count()
    message = body(f"smtplib-{listener}-{version}")
    context = python_context(matrix.ca_file, version, version)
    if listener == "legacy2525":
        client = smtplib.SMTP("127.0.0.1", matrix.port(listener), timeout=30)
        client.starttls(context=context)
    else:
        client = smtplib.SMTP_SSL("127.0.0.1", matrix.port(listener), context=context,
                                  timeout=30)
    with client:
        assert client.sock.version() == version
        client.login(USER, PASSWORD)
        assert client.sendmail(SENDER, [RECIPIENT], message) == {}
    stored = matrix.delivered(before)
    assert stored.sent == message
    assert tls_log.negotiated(listener) == [version]
    assert f"with ESMTPSA ({version} ".encode() in trace_header(stored)


# 5. AUTH LOGIN only; AUTH PLAIN with and without an initial response.

@swaks
@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
def test_swaks_auth_mechanism(matrix: Matrix, tmp_path: Any, mechanism: str) -> None:
    before = matrix.count()
    message = body(f"swaks-auth-{mechanism}")
    result = run_client(swaks_command(
        matrix.port("legacy465"), "--tls-on-connect", "--tls-verify",
        "--tls-ca-path", matrix.ca_file,
        "--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD,
        *swaks_data(tmp_path, message)))
    assert result.returncode == 0, result.stdout + result.stderr
    sent = [line for line in result.stdout.splitlines() if line.startswith(" ~> AUTH")]
    if mechanism == "LOGIN":
        assert sent == [" ~> AUTH LOGIN"], result.stdout
        assert "<~  334 VXNlcm5hbWU6" in result.stdout  # "Username:"
    else:
        assert sent == [f" ~> AUTH PLAIN {PLAIN}"], result.stdout  # the initial response
    assert "<~  235 2.7.0 Authentication successful" in result.stdout, result.stdout
    assert matrix.delivered(before).sent == message


def raw_tls(matrix: Matrix, listener: str) -> RawClient:
    """A raw client on an implicit-TLS listener, greeted."""
    client = RawClient(matrix.port(listener))
    client.sock = client_context(matrix.certificate).wrap_socket(client.sock,
                                                                 server_hostname="localhost")
    assert client.code() == "220"
    return client


def send_transaction(client: RawClient, message: bytes, sender: str = SENDER) -> None:
    """MAIL, RCPT, DATA and the message, each waiting for its reply; then QUIT."""
    client.send(f"MAIL FROM:<{sender}>\r\n".encode())
    assert client.code() == "250"
    client.send(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
    assert client.code() == "250"
    client.send(b"DATA\r\n")
    assert client.code() == "354"
    client.send(stuffed(message) + b".\r\n")
    assert client.reply() == ["250 2.0.0 OK queued"]
    client.send(b"QUIT\r\n")
    assert client.code() == "221"
    client.close()


def test_auth_plain_without_initial_response(matrix: Matrix) -> None:
    before = matrix.count()
    message = body("plain-challenge")
    client = raw_tls(matrix, "legacy465")
    client.send(b"EHLO device.example\r\n")
    assert client.code() == "250"
    client.send(b"AUTH PLAIN\r\n")
    assert client.reply() == ["334 "]
    client.send(PLAIN.encode() + b"\r\n")
    assert client.code() == "235"
    send_transaction(client, message)
    assert matrix.delivered(before).sent == message


# 6. HELO only.

def test_helo_only_plain_text(matrix: Matrix) -> None:
    """An old device that never heard of ESMTP, on the trusted plain-text listener."""
    before = matrix.count()
    message = body("helo-only")
    client = RawClient(matrix.port("legacy2525"))
    assert client.code() == "220"
    client.send(b"HELO old-device.example\r\n")
    assert client.reply() == ["250 localhost"]
    send_transaction(client, message)
    stored = matrix.delivered(before)
    assert stored.sent == message
    header = trace_header(stored)
    assert b"from old-device.example ([127.0.0.1])" in header and b"with SMTP id" in header


def test_helo_then_auth_login_over_tls(matrix: Matrix) -> None:
    """Devices that say HELO and still log in (AUTH LOGIN, prompt by prompt)."""
    before = matrix.count()
    message = body("helo-auth-login")
    client = raw_tls(matrix, "legacy465")
    client.send(b"HELO old-device.example\r\n")
    assert client.code() == "250"
    client.send(b"AUTH LOGIN\r\n")
    assert client.reply() == ["334 VXNlcm5hbWU6"]
    client.send(base64.b64encode(USER.encode()) + b"\r\n")
    assert client.reply() == ["334 UGFzc3dvcmQ6"]
    client.send(base64.b64encode(PASSWORD.encode()) + b"\r\n")
    assert client.code() == "235"
    send_transaction(client, message)
    stored = matrix.delivered(before)
    assert stored.sent == message
    assert b"with SMTPSA (TLSv1.3 " in trace_header(stored)


# 7. No AUTH from a trusted network, no TLS.

@swaks
def test_trusted_network_plain_text_without_auth(matrix: Matrix, tmp_path: Any) -> None:
    before = matrix.count()
    message = body("trusted-no-auth")
    result = run_client(swaks_command(
        matrix.port("legacy2525"), *swaks_data(tmp_path, message)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STARTTLS" in result.stdout and " ~> STARTTLS" not in result.stdout
    assert " ~> AUTH" not in result.stdout
    stored = matrix.delivered(before)
    assert stored.sent == message
    assert b"with ESMTP id" in trace_header(stored)


def test_no_auth_refused_where_required(matrix: Matrix) -> None:
    """The same client without AUTH on legacy465 (AUTH required) gets nowhere."""
    before = matrix.count()
    with smtplib.SMTP_SSL("127.0.0.1", matrix.port("legacy465"),
                          context=client_context(matrix.certificate), timeout=30) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(SENDER, [RECIPIENT], body("no-auth"))
    assert refused.value.smtp_code == 530
    assert matrix.count() == before


# 8. Bare LF line endings.

LF_LINES = [b"From: <scanner@example.com>", b"Subject: compat bare LF",
            b"X-Device: label printer", b"", b"first line", b"..dotted line",
            b"8-bit \xe9\xff", b"last line"]
LF_STORED = b"".join(line.removeprefix(b".") + b"\r\n" if line.startswith(b"..")
                     else line + b"\r\n" for line in LF_LINES)


def lf_transaction(client: RawClient) -> None:
    """Every command ended by a bare LF, each waiting for its reply, up to the body."""
    assert client.code() == "220"
    for command, code in ((b"EHLO lf-device.example", "250"),
                          (f"MAIL FROM:<{SENDER}>".encode(), "250"),
                          (f"RCPT TO:<{RECIPIENT}>".encode(), "250"), (b"DATA", "354")):
        client.send(command + b"\n")
        assert client.code() == code
    client.send(b"\n".join(LF_LINES) + b"\n")


def test_bare_lf_device(matrix: Matrix) -> None:
    before = matrix.count()
    client = RawClient(matrix.port("lfdevice"))
    lf_transaction(client)
    client.send(b".\n")
    assert client.reply() == ["250 2.0.0 OK queued"]
    client.send(b"QUIT\n")
    assert client.code() == "221"
    client.close()
    assert matrix.delivered(before).sent == LF_STORED


def test_bare_lf_end_needs_the_listener_option(matrix: Matrix) -> None:
    """Without accept_bare_lf_end, LF.LF is a line holding a dot; only CRLF.CRLF ends."""
    before = matrix.count()
    client = RawClient(matrix.port("legacy2525"))
    lf_transaction(client)
    client.send(b".\n")
    assert client.nothing_more(0.5)
    client.send(b"\r\n.\r\n")
    assert client.reply() == ["250 2.0.0 OK queued"]
    client.send(b"QUIT\n")
    assert client.code() == "221"
    client.close()
    # The dot line stays in the message, followed by the empty line the CRLF ended.
    assert matrix.delivered(before).sent == LF_STORED + b".\r\n\r\n"


# 9. Pipelining without waiting for PIPELINING.

@pytest.mark.parametrize(("listener", "half_close"), [
    ("legacy2525", False), ("legacy465", False), ("legacy2525", True)],
    ids=["plain", "implicit-tls", "then-half-close"])
def test_everything_in_one_write(matrix: Matrix, listener: str, half_close: bool) -> None:
    """EHLO to QUIT in one write, not waiting for PIPELINING; "then-half-close" also shuts
    its sending side at once, as a script piping into netcat does."""
    before = matrix.count()
    message = body(f"one-write-{listener}-{half_close}")
    if listener == "legacy465":
        client = raw_tls(matrix, listener)
        login = f"AUTH PLAIN {PLAIN}\r\n"
        expected = ["250", "235", "250", "250", "354", "250", "221"]
    else:
        client = RawClient(matrix.port(listener))
        assert client.code() == "220"
        login = ""
        expected = ["250", "250", "250", "354", "250", "221"]
    client.send(f"EHLO eager-device.example\r\n{login}MAIL FROM:<{SENDER}>\r\n"
                f"RCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
                + stuffed(message) + b".\r\nQUIT\r\n")
    if half_close:
        client.sock.shutdown(socket.SHUT_WR)
    replies = []
    while True:
        try:
            replies.append(client.reply())
        except ConnectionError:
            break
    client.close()
    assert [reply[-1][:3] for reply in replies] == expected, replies
    assert matrix.delivered(before).sent == message


# 10. Lower-case commands, a space after the colon.

@pytest.mark.parametrize(("mail", "rcpt"), [
    ("mail from: <a@b.example>", f"rcpt to: <{RECIPIENT}>"),
    ("mail from:a@b.example", f"rcpt to:{RECIPIENT}"),
], ids=["space-after-colon", "no-angle-brackets"])
def test_lower_case_commands(matrix: Matrix, mail: str, rcpt: str) -> None:
    before = matrix.count()
    message = body("lower-case")
    client = RawClient(matrix.port("legacy2525"))
    assert client.code() == "220"
    for command, code in ((b"ehlo lower-device.example", "250"), (mail.encode(), "250"),
                          (rcpt.encode(), "250"), (b"data", "354"),
                          (stuffed(message) + b".", "250"), (b"quit", "221")):
        client.send(command + b"\r\n")
        assert client.code() == code, command
    client.close()
    stored = matrix.delivered(before)
    assert (stored.sender, stored.recipients) == ("a@b.example", [RECIPIENT])
    assert stored.sent == message


# 11. 8-bit headers without BODY=8BITMIME.

def test_eight_bit_headers_without_8bitmime(matrix: Matrix) -> None:
    before = matrix.count()
    message = (b"From: =?utf-8?q?Sc=C3=A4nner?= <scanner@example.com>\r\n"
               b"To: B\xc3\xbcro <office@example.com>\r\n"
               b"Subject: Scan \xc3\xa4\xc3\xb6\xc3\xbc \xe2\x82\xac, Latin-1 \xe4\xf6\xfc\xe9\r\n"
               b"X-Raw: \xff\xfe\x80\r\n\r\nK\xf6rper: 8-bit body, no BODY= given\r\n")
    with smtplib.SMTP("127.0.0.1", matrix.port("legacy2525"), timeout=30) as client:
        client.starttls(context=client_context(matrix.certificate))
        client.login(USER, PASSWORD)
        assert client.sendmail(SENDER, [RECIPIENT], message) == {}
    stored = matrix.delivered(before)
    assert stored.sent == message
    assert not any(option.upper().startswith("BODY=") for option in stored.mail_options)


# 12. curl: a 25 MiB attachment over implicit TLS; STARTTLS with a small message.

def mime_message(attachment: bytes) -> bytes:
    """A multipart message carrying C{attachment} in base64 lines of 76 characters, CRLF."""
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (b"From: <scanner@example.com>\r\nTo: <office@example.com>\r\n"
            b"Subject: compat scan with attachment\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="compat-boundary"\r\n\r\n'
            b"--compat-boundary\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            b"The scan is attached.\r\n.\r\n..\r\n\r\n"
            b"--compat-boundary\r\nContent-Type: application/pdf\r\n"
            b'Content-Disposition: attachment; filename="scan.pdf"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + encoded + b"--compat-boundary--\r\n")


def curl_command(url: str, path: str, *options: str) -> list[str]:
    """curl sending the file at C{path}; the URL's path is its EHLO name (curl would
    otherwise use the file's name)."""
    return ["curl", "--silent", "--show-error", "--verbose", "--url", url + "/curl.example",
            "--mail-from", SENDER, "--mail-rcpt", RECIPIENT, "--upload-file", path, *options]


def logged_in(matrix: Matrix) -> list[str]:
    return ["--cacert", matrix.ca_file, "--user", f"{USER}:{PASSWORD}"]


@curl
@pytest.mark.slow
def test_curl_large_attachment(matrix: Matrix, tls_log: TLSLog, tmp_path: Any) -> None:
    before = matrix.count()
    message = mime_message(random.Random(25).randbytes(25 << 20))
    assert all(len(line) <= 76 for line in message.split(b"\r\n"))
    assert len(message) < 36_700_160  # fits the bridge's default max_message_size
    path = write_message(tmp_path, "scan.eml", message)
    result = run_client(curl_command(f"smtps://127.0.0.1:{matrix.port('legacy465')}", path,
                                     *logged_in(matrix)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "> EHLO curl.example" in result.stderr
    stored = matrix.delivered(before)
    assert sha(stored.sent) == sha(message)
    assert stored.mail_options == [f"SIZE={len(message)}"]  # curl's SIZE, passed on
    assert tls_log.negotiated("legacy465") == ["TLSv1.3"]


@curl
@pytest.mark.parametrize("version", ["TLSv1.1", "TLSv1.3"])
def test_curl_starttls(matrix: Matrix, tls_log: TLSLog, tmp_path: Any, version: str) -> None:
    """curl on the STARTTLS listener with --ssl-reqd: a current curl, and one held to TLS 1.1."""
    before = matrix.count()
    message = body(f"curl-starttls-{version}")
    options = ["--ssl-reqd", *logged_in(matrix)]
    if version == "TLSv1.1":
        options += ["--tlsv1.1", "--tls-max", "1.1", "--ciphers", LEGACY_CIPHERS]
    result = run_client(curl_command(f"smtp://127.0.0.1:{matrix.port('legacy2525')}",
                                     write_message(tmp_path, "message.eml", message), *options))
    assert result.returncode == 0, result.stderr
    assert "> STARTTLS" in result.stderr and f"SSL connection using {version} " in result.stderr
    stored = matrix.delivered(before)
    assert stored.sent == message
    assert tls_log.negotiated("legacy2525") == [version]
    assert f"with ESMTPSA ({version} ".encode() in trace_header(stored)


@curl
def test_curl_lf_file_with_crlf_option(matrix: Matrix, tmp_path: Any) -> None:
    """A file with LF line ends needs curl's --crlf: curl then sends CRLF and stuffs the
    dots.  (Without it curl 7.88 sends the LFs as they are, does not stuff a dot after
    a bare LF and ends with CRLF.CRLF, which adds an empty last line.)"""
    before = matrix.count()
    content = b"\n".join(LF_LINES) + b"\n"  # "..dotted line" is content here
    path = write_message(tmp_path, "lf.eml", content)
    result = run_client(curl_command(f"smtp://127.0.0.1:{matrix.port('lfdevice')}", path,
                                     "--crlf"))
    assert result.returncode == 0, result.stderr
    assert matrix.delivered(before).sent == content.replace(b"\n", b"\r\n")

