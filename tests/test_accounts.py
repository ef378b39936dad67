"""Accounts, routes and credential mappers, end to end: real clients -> the bridge -> aiosmtpd.

Each bridge here is built from a TOML written for the test, with one or two
upstreams from L{tests.upstream} (each requiring STARTTLS and AUTH with its own
login).  What an upstream logged in with, stored and received is the evidence
of which account and route served a client, and of what the bridge changed in
the message on the way.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import json
import re
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smtpbridge.errors import ConfigError
from tests.conftest import (
    PASSWORD,
    USER,
    RunningBridge,
    client_context,
    start_bridge,
    stop_bridge,
)
from tests.test_loopback import RawClient
from tests.upstream import Upstream, commands, upstream_factory

FIXTURES = (upstream_factory,)  # pytest finds fixtures by module attribute

BRIDGE_NAME = "localhost"  # the bridge's [server] hostname
RECIPIENT = "office@example.com"
ALPHA_USER, ALPHA_PASSWORD = "alpha@example.com", "Alpha-upstream-Pass-3"
BETA_USER, BETA_PASSWORD = "beta@example.com", "Beta-upstream-Pass-5"

Start = Callable[..., Upstream]
Bridge = Callable[..., RunningBridge]

LISTENERS = """
[[listener]]
name = "smtps"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
auth = "required"

[[listener]]
name = "legacy"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "starttls"
auth = "optional"
"""


# Building the bridge.

def q(value: object) -> str:
    """A TOML value (JSON strings, lists and numbers are valid TOML)."""
    return json.dumps(value)


def route(name: str, server: Upstream, hosts: list[str] | None = None) -> str:
    """The route table C{name} ("default": the plain [upstream] table) to C{server}'s port."""
    header = "[upstream]" if name == "default" else f"[upstream.{name}]"
    where = f"hosts = {q(hosts)}" if hosts is not None else f"host = {q(server.host)}"
    return f"""
{header}
{where}
port = {server.port}
tls = {q(server.tls)}
ca_certificates = {q(server.ca_file)}
timeout = 20
"""


def account(directory: Any, name: str, server: Upstream, route: str,
            password: str | None = None, **options: object) -> str:
    """The table [account.NAME] with C{server}'s login (C{password} for a wrong one); the
    password in a file."""
    password_file = directory / f"account-{name}-password"
    password_file.write_text((password or server.password) + "\n", encoding="utf-8")
    extra = "".join(f"{key} = {q(value)}\n" for key, value in options.items())
    return f"""
[account.{name}]
username = {q(server.username)}
password_file = {q(str(password_file))}
route = {q(route)}
{extra}"""


def two_accounts(directory: Any, alpha: Upstream, beta: Upstream) -> str:
    """Routes "a" and "b" to two upstreams; accounts "alpha" and "beta" on them."""
    return (route("a", alpha) + route("b", beta)
            + account(directory, "alpha", alpha, "a") + account(directory, "beta", beta, "b"))


def credentials(mapper: str, table: dict[str, str] | None = None,
                default: str | None = None) -> str:
    lines = ["[credentials]", f"mapper = {q(mapper)}"]
    if default is not None:
        lines.append(f"default = {q(default)}")
    if table:
        lines.append("[credentials.map]")
        lines += [f"{q(key)} = {q(value)}" for key, value in table.items()]
    return "\n" + "\n".join(lines) + "\n"


@pytest.fixture
def bridge_for(reactor: Any, certificate: tuple[str, str], users_file: str,
               tmp_path: Any) -> Iterator[Bridge]:
    """Starts a bridge from C{tables} (routes, accounts, credentials, senders) behind the
    standard [server], [tls], listeners ("smtps": implicit TLS, AUTH required;
    "legacy": STARTTLS offered, AUTH optional for 127.0.0.0/8) and [access]."""
    running: list[RunningBridge] = []

    def start(tables: str, *, users: bool = True, server: str = "",
              listeners: str = "") -> RunningBridge:
        cert, key = certificate
        directory = tmp_path / f"bridge-{len(running)}"
        directory.mkdir()
        toml = f"""
[server]
hostname = {q(BRIDGE_NAME)}
{server}

[tls]
certificate = {q(cert)}
key = {q(key)}
{LISTENERS}{listeners}
[access]
trusted_networks = ["127.0.0.0/8"]
auth_failure_delay = 0
{f"users_file = {q(users_file)}" if users else ""}
{tables}"""
        running.append(start_bridge(reactor, toml, str(directory)))
        return running[-1]

    yield start
    for bridge in running:
        stop_bridge(reactor, bridge)


# Clients.

def send_logged_in(bridge: RunningBridge, certificate: tuple[str, str], sender: str,
                   message: bytes = b"Subject: hi\r\n\r\nhello\r\n",
                   recipients: tuple[str, ...] = (RECIPIENT,)) -> None:
    """One message over the implicit-TLS listener, logged in as USER."""
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(sender, list(recipients), message) == {}


def send_trusted(bridge: RunningBridge, sender: str,
                 message: bytes = b"Subject: hi\r\n\r\nhello\r\n",
                 certificate: tuple[str, str] | None = None) -> None:
    """One message over the legacy listener without AUTH (a trusted network), after
    STARTTLS when C{certificate} is given."""
    with smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=30) as client:
        if certificate is not None:
            client.starttls(context=client_context(certificate))
        assert client.sendmail(sender, [RECIPIENT], message) == {}


def raw_session(bridge: RunningBridge, listener: str, certificate: tuple[str, str],
                login: bool = True) -> RawClient:
    """A raw client greeted and past EHLO (and AUTH PLAIN as USER on "smtps")."""
    client = RawClient(bridge.ports[listener])
    if listener == "smtps":
        client.sock = client_context(certificate).wrap_socket(client.sock,
                                                              server_hostname="localhost")
    assert client.code() == "220"
    client.send(b"EHLO device.example\r\n")
    assert client.code() == "250"
    if login:
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        client.send(f"AUTH PLAIN {plain}\r\n".encode())
        assert client.code() == "235"
    return client


def quit_and_close(client: RawClient) -> None:
    client.send(b"QUIT\r\n")
    assert client.code() == "221"
    client.close()


def senders(server: Upstream) -> list[str]:
    return [message.sender for message in server.stored()]


def logins(server: Upstream) -> list[tuple[str, str, bool]]:
    with server.lock:
        return list(server.logins)


def untouched(*servers: Upstream) -> bool:
    """True when none of C{servers} was sent a byte (so none was logged in to)."""
    time.sleep(0.3)  # anything the bridge started would have arrived by now
    for server in servers:
        with server.lock:
            if server.received or server.logins or server.messages:
                return False
    return True




def mail_froms(server: Upstream) -> list[bytes]:
    """The reverse-path of every MAIL command the upstream received under TLS."""
    return [line.split(b" ")[1].removeprefix(b"FROM:")
            for line in commands(server.under_tls()) if line.upper().startswith(b"MAIL ")]


def header_fields(message: bytes) -> list[bytes]:
    """The header section's fields, each with its continuation lines and CRLFs."""
    header, separator, _ = message.partition(b"\r\n\r\n")
    assert separator, message[:200]
    fields: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def body(message: bytes) -> bytes:
    """What follows the header section."""
    return message.partition(b"\r\n\r\n")[2]


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# 1. rewrite_sender.

DEVICE = "scanner@device.local"
DEVICE_FROM = b"Scanner 2F <scanner@device.local>"
DEVICE_MESSAGE = (
    b"From: " + DEVICE_FROM + b"\r\n"
    b"To: Office <office@example.com>\r\n"
    b"Subject: =?utf-8?q?Scan_=C3=A9tage_2?=\r\n"
    b"  and a folded second line\r\n"
    b"X-Device-Location: \xe9tage 2, b\xfcro \xff\r\n"
    b"Message-ID: <scan-0001@device.local>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b".\r\n"
    b"From: Scanner 2F <scanner@device.local>\r\n"
    b"Reply-To: <nobody@device.local>\r\n"
    b"8-bit \xe9\xe0\xff\x80 bytes\r\n"
    b"\r\n"
    b"last line\r\n"
)
SCANNER_ACCOUNT = "scanner-2f@example.com"


@pytest.mark.parametrize("address", [None, "scans@example.com"],
                         ids=["address-is-username", "explicit-address"])
def test_rewrite_sender(bridge_for: Bridge, upstream_factory: Start,
                        certificate: tuple[str, str], tmp_path: Any,
                        address: str | None) -> None:
    server = upstream_factory(username=SCANNER_ACCOUNT)
    options: dict[str, object] = {"rewrite_sender": True}
    if address is not None:
        options["address"] = address
    bridge = bridge_for(route("default", server)
                        + account(tmp_path, "scanner", server, "default", **options)
                        + '\n[credentials]\nmapper = "static"\naccount = "scanner"\n')
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(DEVICE, [RECIPIENT], DEVICE_MESSAGE,
                               mail_options=["BODY=8BITMIME"]) == {}
    expected_address = (address or SCANNER_ACCOUNT).encode()
    [stored] = server.stored()
    assert (stored.sender, stored.recipients) == (expected_address.decode(), [RECIPIENT])
    assert logins(server) == [("PLAIN", SCANNER_ACCOUNT, True)]
    expected_fields = []
    for field in header_fields(DEVICE_MESSAGE):
        if field.startswith(b"From:"):
            expected_fields += [b"From: Scanner 2F <" + expected_address + b">\r\n",
                                b"Reply-To: " + DEVICE_FROM + b"\r\n"]
        else:
            expected_fields.append(field)
    assert header_fields(stored.sent) == expected_fields
    assert body(stored.sent) == body(DEVICE_MESSAGE)
    # Nothing but those two lines changed.
    assert stored.sent == DEVICE_MESSAGE.replace(
        b"From: " + DEVICE_FROM + b"\r\n",
        b"From: Scanner 2F <" + expected_address + b">\r\nReply-To: " + DEVICE_FROM + b"\r\n",
        1)


def test_without_rewrite_sender_the_message_is_unchanged(
        bridge_for: Bridge, upstream_factory: Start, certificate: tuple[str, str],
        tmp_path: Any) -> None:
    server = upstream_factory(username=SCANNER_ACCOUNT)
    bridge = bridge_for(route("default", server)
                        + account(tmp_path, "scanner", server, "default")
                        + '\n[credentials]\nmapper = "static"\naccount = "scanner"\n')
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(DEVICE, [RECIPIENT], DEVICE_MESSAGE,
                               mail_options=["BODY=8BITMIME"]) == {}
    [stored] = server.stored()
    assert (stored.sender, stored.recipients) == (DEVICE, [RECIPIENT])
    assert stored.sent == DEVICE_MESSAGE  # .sent checks for the bridge's Received: on top


def test_rewrite_sender_keeps_the_null_sender(bridge_for: Bridge, upstream_factory: Start,
                                              tmp_path: Any, certificate: tuple[str, str],
                                              ) -> None:
    """A bounce (MAIL FROM:<>) stays one; only its From: header changes."""
    server = upstream_factory(username=SCANNER_ACCOUNT)
    bridge = bridge_for(route("default", server)
                        + account(tmp_path, "scanner", server, "default", rewrite_sender=True)
                        + '\n[credentials]\nmapper = "static"\naccount = "scanner"\n')
    send_logged_in(bridge, certificate, "", b"From: <mailer-daemon@device.local>\r\n"
                                            b"Subject: bounce\r\n\r\nreturned\r\n")
    [stored] = server.stored()
    assert mail_froms(server) == [b"<>"]
    assert stored.sent == (f"From: <{SCANNER_ACCOUNT}>\r\n".encode()
                           + b"Reply-To: <mailer-daemon@device.local>\r\n"
                           + b"Subject: bounce\r\n\r\nreturned\r\n")


@pytest.mark.parametrize(("username", "address", "key"), [
    ("apikey", None, "rewrite_sender"),
    ("scanner@example.com", "Scanner <scanner@example.com>", "address")],
    ids=["username-no-address", "address-with-name"])
def test_rewrite_sender_without_a_usable_address_is_a_config_error(
        bridge_for: Bridge, upstream_factory: Start, tmp_path: Any, username: str,
        address: str | None, key: str) -> None:
    """An address the From: rewrite cannot use stops the start, rather than failing every
    MAIL FROM later (after an upstream login) with an internal error."""
    server = upstream_factory(username=username)
    options: dict[str, object] = {"rewrite_sender": True}
    if address is not None:
        options["address"] = address
    with pytest.raises(ConfigError) as caught:
        bridge_for(route("default", server)
                   + account(tmp_path, "relay", server, "default", **options)
                   + '\n[credentials]\naccount = "relay"\n')
    assert caught.value.key == f"account.relay.{key}", caught.value
    assert server.logins == [] and server.received == []


# 2. The Received: header.

def unfolded(field: bytes) -> str:
    return re.sub(r"\r\n[ \t]+", " ", field.decode("ascii")).removesuffix("\r\n")


def bridge_received(content: bytes) -> str:
    """The one Received: field the bridge added (checked to be first and alone), unfolded."""
    fields = header_fields(content)
    ours = [index for index, field in enumerate(fields)
            if field.startswith(b"Received:") and b"(smtpbridge, listener " in field]
    assert ours == [0], fields
    return unfolded(fields[0])


def check_date(text: str) -> None:
    when = email.utils.parsedate_to_datetime(text)
    assert when.tzinfo is not None, text
    now = datetime.datetime.now(datetime.UTC)
    assert abs((now - when).total_seconds()) < 300, text


@pytest.mark.parametrize("listener", ["smtps", "legacy"])
def test_received_header_names_the_client(bridge_for: Bridge, upstream_factory: Start,
                                          certificate: tuple[str, str], tmp_path: Any,
                                          listener: str) -> None:
    """Implicit TLS, or STARTTLS on the legacy listener: ESMTPSA with the real TLS
    version and cipher, the login, the listener and the one recipient."""
    server = upstream_factory()
    bridge = bridge_for(route("default", server) + account(tmp_path, "main", server, "default")
                        + '\n[credentials]\naccount = "main"\n')
    message = (b"Received: from scanner by device.local; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
               b"Subject: traced\r\n\r\nhello\r\n")
    helo = "scanner-2f.device.local"
    client: smtplib.SMTP
    if listener == "smtps":
        client = smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"], local_hostname=helo,
                                  context=client_context(certificate), timeout=30)
    else:
        client = smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], local_hostname=helo,
                              timeout=30)
        client.starttls(context=client_context(certificate))
    with client:
        version, cipher = client.sock.version(), client.sock.cipher()[0]
        client.login(USER, PASSWORD)
        assert client.sendmail(DEVICE, [RECIPIENT], message) == {}
    assert version in ("TLSv1.2", "TLSv1.3")
    [stored] = server.stored()
    pattern = re.escape(
        f"Received: from {helo} ([127.0.0.1]) by {BRIDGE_NAME} "
        f"(smtpbridge, listener {listener}) with ESMTPSA ({version} {cipher}) id "
    ) + r"([0-9a-f]{12}) " + re.escape(f"for <{RECIPIENT}>; ") + r"(.+)"
    header = bridge_received(stored.content)
    match = re.fullmatch(pattern, header)
    assert match, header
    check_date(match.group(2))
    # The device's own trace header follows, untouched; so does the rest.
    assert stored.sent == message


def test_received_header_plain_helo_several_recipients(
        bridge_for: Bridge, upstream_factory: Start, tmp_path: Any) -> None:
    """HELO without TLS or AUTH is "with SMTP"; several recipients are not named."""
    server = upstream_factory()
    bridge = bridge_for(route("default", server) + account(tmp_path, "main", server, "default")
                        + '\n[credentials]\naccount = "main"\n')
    client = RawClient(bridge.ports["legacy"])
    assert client.code() == "220"
    client.send(b"HELO old-device\r\n")
    assert client.code() == "250"
    client.send(f"MAIL FROM:<{DEVICE}>\r\n".encode())
    assert client.code() == "250"
    for recipient in (RECIPIENT, "boss@example.com"):
        client.send(f"RCPT TO:<{recipient}>\r\n".encode())
        assert client.code() == "250"
    client.send(b"DATA\r\n")
    assert client.code() == "354"
    client.send(b"Subject: plain\r\n\r\nhello\r\n.\r\n")
    assert client.code() == "250"
    quit_and_close(client)
    [stored] = server.stored()
    header = bridge_received(stored.content)
    match = re.fullmatch(re.escape(
        f"Received: from old-device ([127.0.0.1]) by {BRIDGE_NAME} "
        "(smtpbridge, listener legacy) with SMTP id ") + r"[0-9a-f]{12}; (.+)", header)
    assert match, header
    check_date(match.group(1))
    assert stored.sent == b"Subject: plain\r\n\r\nhello\r\n"


def test_a_message_opening_with_a_folded_line_does_not_join_received(
        bridge_for: Bridge, upstream_factory: Start, tmp_path: Any) -> None:
    """A first line that begins with a blank would continue the bridge's Received:
    field; an empty line goes between (the message then has no header section of its
    own, as Postfix sends it)."""
    server = upstream_factory()
    bridge = bridge_for(route("default", server) + account(tmp_path, "main", server, "default")
                        + '\n[credentials]\naccount = "main"\n')
    client = RawClient(bridge.ports["legacy"])
    assert client.code() == "220"
    for command, code in ((b"HELO old-device", "250"), (f"MAIL FROM:<{DEVICE}>".encode(), "250"),
                          (f"RCPT TO:<{RECIPIENT}>".encode(), "250"), (b"DATA", "354")):
        client.send(command + b"\r\n")
        assert client.code() == code
    client.send(b"\tfolded first\r\nSubject: late\r\n\r\nhello\r\n.\r\n")
    assert client.code() == "250"
    quit_and_close(client)
    [stored] = server.stored()
    assert header_fields(stored.content)[1:] == []  # the Received: field alone
    check_date(bridge_received(stored.content).rsplit("; ", 1)[1])
    assert stored.sent == b"\r\n\tfolded first\r\nSubject: late\r\n\r\nhello\r\n"


def test_no_received_header_when_turned_off(bridge_for: Bridge, upstream_factory: Start,
                                            certificate: tuple[str, str], tmp_path: Any,
                                            ) -> None:
    server = upstream_factory()
    bridge = bridge_for(route("default", server) + account(tmp_path, "main", server, "default")
                        + '\n[credentials]\naccount = "main"\n',
                        server="received_header = false")
    send_logged_in(bridge, certificate, DEVICE, DEVICE_MESSAGE)
    [stored] = server.stored()
    assert stored.content == DEVICE_MESSAGE


# 3. per-user.

def test_per_user(bridge_for: Bridge, upstream_factory: Start, certificate: tuple[str, str],
                  tmp_path: Any) -> None:
    alpha = upstream_factory(username=ALPHA_USER, password=ALPHA_PASSWORD)
    beta = upstream_factory(username=BETA_USER, password=BETA_PASSWORD)
    bridge = bridge_for(two_accounts(tmp_path, alpha, beta)
                        + credentials("per-user", {USER: "beta"}, default="alpha"))
    send_logged_in(bridge, certificate, "user@example.com")
    assert senders(beta) == ["user@example.com"]
    assert logins(beta) == [("PLAIN", BETA_USER, True)]
    assert untouched(alpha)
    # A trusted client without AUTH, after STARTTLS: the default account.
    send_trusted(bridge, "trusted@example.com", certificate=certificate)
    assert senders(alpha) == ["trusted@example.com"]
    assert logins(alpha) == [("PLAIN", ALPHA_USER, True)]
    assert senders(beta) == ["user@example.com"]


def test_per_user_without_default(bridge_for: Bridge, upstream_factory: Start,
                                  certificate: tuple[str, str], tmp_path: Any) -> None:
    alpha = upstream_factory(username=ALPHA_USER, password=ALPHA_PASSWORD)
    beta = upstream_factory(username=BETA_USER, password=BETA_PASSWORD)
    bridge = bridge_for(two_accounts(tmp_path, alpha, beta)
                        + credentials("per-user", {USER: "beta"}))
    for tls in (False, True):
        client = RawClient(bridge.ports["legacy"])
        assert client.code() == "220"
        client.send(b"EHLO device.example\r\n")
        assert client.code() == "250"
        if tls:
            client.send(b"STARTTLS\r\n")
            assert client.code() == "220"
            client.sock = client_context(certificate).wrap_socket(
                client.sock, server_hostname="localhost")
            client.send(b"EHLO device.example\r\n")
            assert client.code() == "250"
        client.send(f"MAIL FROM:<{DEVICE}>\r\n".encode())
        [line] = client.reply()
        assert line.startswith("550 5.7.1 "), line
        for secret in (ALPHA_PASSWORD, BETA_PASSWORD, PASSWORD, "password"):
            assert secret.lower() not in line.lower()
        # The refusal ends that transaction only.
        client.send(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
        assert client.code() == "503"
        quit_and_close(client)
    assert untouched(alpha, beta)
    # The map still serves the user it names.
    send_logged_in(bridge, certificate, "user@example.com")
    assert senders(beta) == ["user@example.com"]
    assert untouched(alpha)


# 4. per-sender.

def test_per_sender(bridge_for: Bridge, upstream_factory: Start, certificate: tuple[str, str],
                    tmp_path: Any) -> None:
    alpha = upstream_factory(username=ALPHA_USER, password=ALPHA_PASSWORD)
    beta = upstream_factory(username=BETA_USER, password=BETA_PASSWORD)
    bridge = bridge_for(two_accounts(tmp_path, alpha, beta) + credentials(
        "per-sender", {"scanner@example.com": "beta", "@example.com": "alpha"}, default="beta"))
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        client.login(USER, PASSWORD)
        for sender in ("scanner@example.com",  # exact address, over its @domain
                       "other@example.com",  # @domain, over the default
                       "someone@elsewhere.example",  # the default
                       "SCANNER@Example.COM",  # addresses and domains compare in any case
                       "Other@EXAMPLE.com"):
            assert client.sendmail(sender, [RECIPIENT], b"Subject: x\r\n\r\nx\r\n") == {}
    assert senders(beta) == ["scanner@example.com", "someone@elsewhere.example",
                             "SCANNER@Example.COM"]
    assert senders(alpha) == ["other@example.com", "Other@EXAMPLE.com"]
    # One login per account: each account's session is kept for its next message.
    assert logins(beta) == [("PLAIN", BETA_USER, True)]
    assert logins(alpha) == [("PLAIN", ALPHA_USER, True)]


# 5. per-device.

@pytest.mark.parametrize(("table", "default", "expected"), [
    ({"network:127.0.0.0/8": "beta", "listener:legacy": "alpha"}, None, "beta"),
    ({"network:10.0.0.0/8": "beta", "listener:legacy": "alpha"}, None, "alpha"),
    ({"network:127.0.0.0/8": "beta", "network:127.0.0.1/32": "alpha"}, None, "alpha"),
    ({"network:10.0.0.0/8": "alpha", "listener:smtps": "alpha"}, "beta", "beta"),
], ids=["network-before-listener", "listener", "most-specific-network", "default"])
def test_per_device_by_network_and_listener(
        bridge_for: Bridge, upstream_factory: Start, tmp_path: Any,
        table: dict[str, str], default: str | None, expected: str) -> None:
    alpha = upstream_factory(username=ALPHA_USER, password=ALPHA_PASSWORD)
    beta = upstream_factory(username=BETA_USER, password=BETA_PASSWORD)
    bridge = bridge_for(two_accounts(tmp_path, alpha, beta)
                        + credentials("per-device", table, default=default))
    send_trusted(bridge, DEVICE)
    chosen, other = (alpha, beta) if expected == "alpha" else (beta, alpha)
    assert senders(chosen) == [DEVICE]
    assert logins(chosen) == [("PLAIN", chosen.username, True)]
    assert untouched(other)


def test_per_device_nothing_matches(bridge_for: Bridge, upstream_factory: Start,
                                    certificate: tuple[str, str], tmp_path: Any) -> None:
    alpha = upstream_factory(username=ALPHA_USER, password=ALPHA_PASSWORD)
    beta = upstream_factory(username=BETA_USER, password=BETA_PASSWORD)
    bridge = bridge_for(two_accounts(tmp_path, alpha, beta)
                        + credentials("per-device", {"listener:legacy": "alpha"}))
    client = raw_session(bridge, "smtps", certificate)
    client.send(f"MAIL FROM:<{DEVICE}>\r\n".encode())
    [line] = client.reply()
    assert line.startswith("550 5.7.1 ") and "smtps" in line, line
    quit_and_close(client)
    assert untouched(alpha, beta)


@pytest.fixture(scope="module")
def device_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A device CA (its PEM at "ca"), a client certificate it issued ("cert", "key",
    "fingerprint": SHA-256 hex of its DER) and one issued by another CA ("stranger_cert",
    "stranger_key")."""
    directory = tmp_path_factory.mktemp("device-pki")
    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common_name)).issuer_name(name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def issue(issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
              common_name: str) -> tuple[str, str, bytes]:
        ca_key, ca_cert = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{common_name}.crt", directory / f"{common_name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert_path), str(key_path), cert.public_bytes(serialization.Encoding.DER)

    device_ca, stranger_ca = make_ca("Device CA"), make_ca("Stranger CA")
    ca_path = directory / "device-ca.pem"
    ca_path.write_bytes(device_ca[1].public_bytes(serialization.Encoding.PEM))
    cert, key, der = issue(device_ca, "scanner-2f")
    stranger_cert, stranger_key, _ = issue(stranger_ca, "stranger")
    return {"ca": str(ca_path), "cert": cert, "key": key,
            "fingerprint": hashlib.sha256(der).hexdigest(),
            "stranger_cert": stranger_cert, "stranger_key": stranger_key}


def devices_listener(ca: str, mode: str, tls: str) -> str:
    return f"""
[[listener]]
name = "devices"
endpoint = "tcp:0:interface=127.0.0.1"
tls = {q(tls)}
auth = "optional"
client_certificates = {q(mode)}
client_ca = {q(ca)}
"""


def device_context(certificate: tuple[str, str], cert: str | None = None,
                   key: str | None = None) -> ssl.SSLContext:
    context = client_context(certificate)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def send_as_device(bridge: RunningBridge, context: ssl.SSLContext, tls: str) -> None:
    """One message over the devices listener, without AUTH."""
    client: smtplib.SMTP
    if tls == "implicit":
        client = smtplib.SMTP_SSL("127.0.0.1", bridge.ports["devices"], context=context,
                                  timeout=30)
    else:
        client = smtplib.SMTP("127.0.0.1", bridge.ports["devices"], timeout=30)
        client.starttls(context=context)
    with client:
        assert client.sendmail(DEVICE, [RECIPIENT], b"Subject: scan\r\n\r\nscan\r\n") == {}


def first_reply_over_tls(bridge: RunningBridge, context: ssl.SSLContext, tls: str) -> str:
    """The first reply of the devices listener under TLS with C{context}: the greeting
    (implicit TLS) or the reply to EHLO after STARTTLS."""
    client = RawClient(bridge.ports["devices"])
    try:
        if tls == "starttls":
            assert client.code() == "220"
            client.send(b"STARTTLS\r\n")
            assert client.code() == "220"
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        if tls == "starttls":
            client.send(b"EHLO device.example\r\n")
        return client.reply()[0]
    finally:
        client.close()


@pytest.fixture(params=["implicit", "starttls"])
def devices_tls(request: pytest.FixtureRequest) -> str:
    """The TLS mode of the listener that asks for client certificates."""
    return request.param


def test_per_device_by_client_certificate(bridge_for: Bridge, upstream_factory: Start,
                                          certificate: tuple[str, str], tmp_path: Any,
                                          device_pki: dict[str, str], devices_tls: str,
                                          ) -> None:
    alpha = upstream_factory(username=ALPHA_USER, password=ALPHA_PASSWORD)
    beta = upstream_factory(username=BETA_USER, password=BETA_PASSWORD)
    bridge = bridge_for(
        two_accounts(tmp_path, alpha, beta) + credentials("per-device", {
            f"certificate:{device_pki['fingerprint']}": "beta",
            "network:127.0.0.0/8": "alpha",
            "listener:devices": "alpha",
        }), listeners=devices_listener(device_pki["ca"], "require", devices_tls))
    # Without a certificate, or with one from another CA, there is no session.
    for context in (device_context(certificate),
                    device_context(certificate, device_pki["stranger_cert"],
                                   device_pki["stranger_key"])):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            first_reply_over_tls(bridge, context, devices_tls)
    assert untouched(alpha, beta)
    # With the device's certificate: its account, before network and listener.
    send_as_device(bridge, device_context(certificate, device_pki["cert"], device_pki["key"]),
                   devices_tls)
    assert senders(beta) == [DEVICE]
    assert logins(beta) == [("PLAIN", BETA_USER, True)]
    assert untouched(alpha)
    # The other listeners ask for no certificate; the network picks.
    send_trusted(bridge, "trusted@example.com")
    assert senders(alpha) == ["trusted@example.com"]


def test_per_device_requested_client_certificate(bridge_for: Bridge, upstream_factory: Start,
                                                 certificate: tuple[str, str], tmp_path: Any,
                                                 device_pki: dict[str, str], devices_tls: str,
                                                 ) -> None:
    """client_certificates = "request": a device without one is served too, by network."""
    alpha = upstream_factory(username=ALPHA_USER, password=ALPHA_PASSWORD)
    beta = upstream_factory(username=BETA_USER, password=BETA_PASSWORD)
    fingerprint = device_pki["fingerprint"].upper()
    bridge = bridge_for(
        two_accounts(tmp_path, alpha, beta) + credentials("per-device", {
            "certificate:" + ":".join(re.findall("..", fingerprint)): "beta",
            "network:127.0.0.0/8": "alpha",
        }), listeners=devices_listener(device_pki["ca"], "request", devices_tls))
    send_as_device(bridge, device_context(certificate), devices_tls)
    assert senders(alpha) == [DEVICE]
    assert untouched(beta)
    send_as_device(bridge, device_context(certificate, device_pki["cert"], device_pki["key"]),
                   devices_tls)
    assert senders(beta) == [DEVICE]
    assert senders(alpha) == [DEVICE]


def test_per_device_certificate_kept_on_session_resumption(
        bridge_for: Bridge, upstream_factory: Start, certificate: tuple[str, str],
        tmp_path: Any, device_pki: dict[str, str]) -> None:
    """A device that resumes its TLS session (no certificate is exchanged then) is still
    known by the certificate of the session."""
    alpha = upstream_factory(username=ALPHA_USER, password=ALPHA_PASSWORD)
    beta = upstream_factory(username=BETA_USER, password=BETA_PASSWORD)
    bridge = bridge_for(
        two_accounts(tmp_path, alpha, beta) + credentials("per-device", {
            f"certificate:{device_pki['fingerprint']}": "beta",
            "network:127.0.0.0/8": "alpha",
        }), listeners=devices_listener(device_pki["ca"], "require", "implicit"))
    context = device_context(certificate, device_pki["cert"], device_pki["key"])
    first = RawClient(bridge.ports["devices"])
    first.sock = context.wrap_socket(first.sock, server_hostname="localhost")
    assert first.code() == "220"
    first.send(b"NOOP\r\n")  # TLS 1.3 session tickets have surely arrived after a round trip
    assert first.code() == "250"
    session = first.sock.session
    quit_and_close(first)
    client = RawClient(bridge.ports["devices"])
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost",
                                      session=session)
    assert client.code() == "220"
    assert client.sock.session_reused
    client.send(f"EHLO scanner\r\nMAIL FROM:<{DEVICE}>\r\nRCPT TO:<{RECIPIENT}>\r\n"
                "DATA\r\n".encode())
    assert [client.code() for _ in range(4)] == ["250", "250", "250", "354"]
    client.send(b"Subject: resumed\r\n\r\nscan\r\n.\r\n")
    assert client.code() == "250"
    quit_and_close(client)
    assert senders(beta) == [DEVICE]
    assert untouched(alpha)


# 6. passthrough.

ALICE, ALICE_PASSWORD = "alice@example.com", "Alice-own-Pass-8"
WRONG_PASSWORD = "Alice-wrong-Pass-2"


def secret_forms(user: str, password: str) -> list[str]:
    return [password, b64(password), b64(f"\0{user}\0{password}"),
            b64(f"{user}\0{user}\0{password}")]


def leaks(lines: list[str], secrets: list[str]) -> list[str]:
    return [line for line in lines for secret in secrets if secret in line]


@pytest.fixture
def passthrough(bridge_for: Bridge, upstream_factory: Start) -> tuple[RunningBridge, Upstream]:
    server = upstream_factory(username=ALICE, password=ALICE_PASSWORD)
    bridge = bridge_for(route("default", server) + credentials("passthrough"), users=False)
    return bridge, server


def test_passthrough_right_password(passthrough: tuple[RunningBridge, Upstream],
                                    certificate: tuple[str, str], logged: list[str]) -> None:
    bridge, server = passthrough
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        code, _ = client.login(ALICE, ALICE_PASSWORD)
        assert code == 235
        # Checked upstream at AUTH time, before any transaction.
        assert logins(server) == [("PLAIN", ALICE, True)]
        assert server.stored() == []
        assert client.sendmail(ALICE, [RECIPIENT], b"Subject: mine\r\n\r\nown login\r\n") == {}
    [stored] = server.stored()
    assert (stored.sender, stored.recipients) == (ALICE, [RECIPIENT])
    assert stored.sent == b"Subject: mine\r\n\r\nown login\r\n"
    # The session that checked the login carried the message.
    assert logins(server) == [("PLAIN", ALICE, True)]
    assert any("AUTH ok" in line for line in logged), "the observer saw nothing"
    assert leaks(logged, secret_forms(ALICE, ALICE_PASSWORD)) == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_passthrough_wrong_password(passthrough: tuple[RunningBridge, Upstream],
                                    certificate: tuple[str, str], logged: list[str],
                                    mechanism: str) -> None:
    bridge, server = passthrough
    client = RawClient(bridge.ports["smtps"])
    client.sock = client_context(certificate).wrap_socket(client.sock,
                                                          server_hostname="localhost")
    assert client.code() == "220"
    client.send(b"EHLO device.example\r\n")
    assert client.code() == "250"
    if mechanism == "PLAIN":
        plain = b64(f"\0{ALICE}\0{WRONG_PASSWORD}")
        client.send(f"AUTH PLAIN {plain}\r\n".encode())
    else:
        client.send(b"AUTH LOGIN\r\n")
        assert client.code() == "334"
        client.send(f"{b64(ALICE)}\r\n".encode())
        assert client.code() == "334"
        client.send(f"{b64(WRONG_PASSWORD)}\r\n".encode())
    [line] = client.reply()
    assert line.startswith("535 5.7.8 "), line
    # The upstream was asked at AUTH time, with the client's own login.
    assert logins(server) == [("PLAIN", ALICE, False)]
    client.send(f"MAIL FROM:<{ALICE}>\r\n".encode())
    assert client.code() == "530"
    quit_and_close(client)
    time.sleep(0.2)
    assert logins(server) == [("PLAIN", ALICE, False)]
    assert server.stored() == []
    secrets = secret_forms(ALICE, WRONG_PASSWORD)
    assert not any(secret in line for secret in secrets)
    assert any("AUTH failed" in text for text in logged), "the observer saw nothing"
    assert leaks(logged, secrets) == []


def test_passthrough_without_auth_is_refused(passthrough: tuple[RunningBridge, Upstream],
                                             ) -> None:
    bridge, server = passthrough
    client = RawClient(bridge.ports["legacy"])
    assert client.code() == "220"
    client.send(b"EHLO device.example\r\n")
    assert client.code() == "250"
    client.send(f"MAIL FROM:<{DEVICE}>\r\n".encode())
    [line] = client.reply()
    assert line.startswith("550 5.7.1 "), line
    quit_and_close(client)
    assert untouched(server)


@pytest.mark.parametrize("hosts", [
    pytest.param(["127.0.0.2", "localhost"], id="after-an-unreachable-host"),
    pytest.param(["localhost", "127.0.0.2"], id="before-an-unreachable-host"),
])
def test_passthrough_wrong_password_on_a_failover_route(
        bridge_for: Bridge, upstream_factory: Start, certificate: tuple[str, str],
        hosts: list[str]) -> None:
    """The upstream's verdict on the password is final, whatever the other hosts do."""
    server = upstream_factory(username=ALICE, password=ALICE_PASSWORD)
    bridge = bridge_for(route("default", server, hosts=hosts) + credentials("passthrough"),
                        users=False)
    client = RawClient(bridge.ports["smtps"])
    client.sock = client_context(certificate).wrap_socket(client.sock,
                                                          server_hostname="localhost")
    assert client.code() == "220"
    client.send(b"EHLO device.example\r\n")
    assert client.code() == "250"
    plain = b64(f"\0{ALICE}\0{WRONG_PASSWORD}")
    client.send(f"AUTH PLAIN {plain}\r\n".encode())
    [line] = client.reply()
    quit_and_close(client)
    assert logins(server) == [("PLAIN", ALICE, False)]
    assert line.startswith("535 5.7.8 "), line


# 7. Failover between the hosts of a route.

def static_main(directory: Any, server: Upstream) -> str:
    return account(directory, "main", server, "default") + '\n[credentials]\naccount = "main"\n'


def test_failover_to_the_next_host(bridge_for: Bridge, upstream_factory: Start,
                                   certificate: tuple[str, str], tmp_path: Any,
                                   logged: list[str]) -> None:
    server = upstream_factory()
    bridge = bridge_for(route("default", server, hosts=["127.0.0.2", "localhost"])
                        + static_main(tmp_path, server))
    send_logged_in(bridge, certificate, DEVICE, b"Subject: once\r\n\r\nonce\r\n")
    [stored] = server.stored()
    assert stored.sent == b"Subject: once\r\n\r\nonce\r\n"
    assert logins(server) == [("PLAIN", server.username, True)]
    time.sleep(0.2)
    assert len(server.stored()) == 1
    assert any(f"127.0.0.2:{server.port}" in line and "connection refused" in line
               and "trying localhost" in line for line in logged), "no failover logged"


def test_failover_after_a_certificate_failure(bridge_for: Bridge, upstream_factory: Start,
                                              certificate: tuple[str, str], tmp_path: Any,
                                              ) -> None:
    """The first host's certificate does not match its name: the next host is tried."""
    server = upstream_factory(certificate_names=["localhost"])
    bridge = bridge_for(route("default", server, hosts=["127.0.0.1", "localhost"])
                        + static_main(tmp_path, server))
    send_logged_in(bridge, certificate, DEVICE, b"Subject: once\r\n\r\nonce\r\n")
    assert len(server.stored()) == 1
    assert logins(server) == [("PLAIN", server.username, True)]
    clear = server.clear_text()
    assert clear.count(b"STARTTLS\r\n") == 2, clear


def test_failover_reports_a_rejected_login(bridge_for: Bridge, upstream_factory: Start,
                                           certificate: tuple[str, str], tmp_path: Any,
                                           ) -> None:
    """The first host refuses the account's password, the second is down: the client is
    told about the password, which is what the administrator must fix."""
    server = upstream_factory()
    bridge = bridge_for(route("default", server, hosts=["localhost", "127.0.0.2"])
                        + account(tmp_path, "main", server, "default",
                                  password="Not-the-real-Pass-2")
                        + '\n[credentials]\naccount = "main"\n')
    client = raw_session(bridge, "smtps", certificate)
    client.send(f"MAIL FROM:<{DEVICE}>\r\n".encode())
    [line] = client.reply()
    quit_and_close(client)
    assert logins(server) == [("PLAIN", server.username, False)]
    assert line.startswith("454 4.7.0 ") and "rejected the login" in line, line


def test_no_failover_once_mail_from_was_sent(bridge_for: Bridge, upstream_factory: Start,
                                             certificate: tuple[str, str], tmp_path: Any,
                                             ) -> None:
    server = upstream_factory(data_reply="451 4.3.0 try later")
    bridge = bridge_for(route("default", server, hosts=["localhost", "localhost"])
                        + static_main(tmp_path, server))
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        client.login(USER, PASSWORD)
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.sendmail(DEVICE, [RECIPIENT], b"Subject: later\r\n\r\nlater\r\n")
    assert (caught.value.smtp_code, caught.value.smtp_error) == (451, b"4.3.0 try later")
    time.sleep(0.3)
    assert mail_froms(server) == [f"<{DEVICE}>".encode()]
    assert [line for line in commands(server.under_tls()) if line.upper() == b"DATA"] == [b"DATA"]
    assert logins(server) == [("PLAIN", server.username, True)]
    assert server.clear_text().count(b"STARTTLS\r\n") == 1
    assert server.stored() == []


# 8. Sender rules.

def test_sender_rules_for_users(bridge_for: Bridge, upstream_factory: Start,
                                certificate: tuple[str, str], tmp_path: Any) -> None:
    server = upstream_factory()
    bridge = bridge_for(route("default", server) + static_main(tmp_path, server)
                        + f"\n[senders.users]\n{q(USER)} = [\"@allowed.example\"]\n")
    client = raw_session(bridge, "smtps", certificate)
    client.send(b"MAIL FROM:<x@other.example>\r\n")
    [line] = client.reply()
    assert line.startswith("553 5.7.1 ") and "x@other.example" in line, line
    assert untouched(server)
    # The null sender is always allowed.
    client.send(b"MAIL FROM:<>\r\n")
    assert client.code() == "250"
    client.send(b"RSET\r\n")
    assert client.code() == "250"
    client.send(b"MAIL FROM:<x@allowed.example>\r\n")
    assert client.code() == "250"
    client.send(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
    assert client.code() == "250"
    client.send(b"DATA\r\n")
    assert client.code() == "354"
    client.send(b"Subject: allowed\r\n\r\nok\r\n.\r\n")
    assert client.code() == "250"
    quit_and_close(client)
    assert senders(server) == ["x@allowed.example"]
    assert mail_froms(server) == [b"<>", b"<x@allowed.example>"]


def test_sender_rules_for_networks(bridge_for: Bridge, upstream_factory: Start,
                                   certificate: tuple[str, str], tmp_path: Any) -> None:
    """Trusted clients without AUTH follow the network's rules; logged-in users do not."""
    server = upstream_factory()
    bridge = bridge_for(route("default", server) + static_main(tmp_path, server)
                        + '\n[senders.networks]\n"127.0.0.0/8" = ["@devices.example"]\n')
    client = raw_session(bridge, "legacy", certificate, login=False)
    client.send(b"MAIL FROM:<scanner@other.example>\r\n")
    [line] = client.reply()
    assert line.startswith("553 5.7.1 ") and "scanner@other.example" in line, line
    quit_and_close(client)
    assert untouched(server)
    send_trusted(bridge, "scanner@devices.example")
    send_logged_in(bridge, certificate, "user@other.example")
    assert senders(server) == ["scanner@devices.example", "user@other.example"]



