"""Hostile clients cannot take the bridge's connections, memory or time from the others.

Each test runs a real bridge on loopback with its limits lowered, attacks it with raw
sockets, and checks both the attacker's fate and that a normal client still gets through.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    DemoUpstream,
    RunningBridge,
    client_context,
    front_toml,
    start_bridge,
    stop_bridge,
)

SENDER = "scanner@example.com"
RECIPIENT = "office@example.com"
MESSAGE = b"Subject: scan\r\n\r\nhello\r\n"

Start = Callable[..., RunningBridge]


@pytest.fixture
def hostile_bridge(reactor, certificate, users_file, tmp_path,
                   demo_upstream: DemoUpstream) -> Iterator[Start]:
    """Starts a bridge relaying to the demo upstream, with [server] and [[listener]] keys
    (keyword arguments; listener_* ones go to both listeners, access_* ones to
    [access]) set for the test."""
    running: list[RunningBridge] = []

    def start(**keys: object) -> RunningBridge:
        (tmp_path / "upstream-password").write_text(UPSTREAM_PASSWORD + "\n")
        server = "".join(f"{key} = {value!r}\n".replace("'", '"').replace("True", "true")
                         .replace("False", "false") for key, value in keys.items()
                         if not key.startswith(("listener_", "access_")))
        access = "".join(f"{key[7:]} = {value!r}\n".replace("'", '"')
                         for key, value in keys.items() if key.startswith("access_"))
        listener = "".join(f"{key[9:]} = {value!r}\n" for key, value in keys.items()
                           if key.startswith("listener_"))
        toml = front_toml(certificate, users_file).replace("[server]\n", "[server]\n" + server)
        toml = toml.replace('tls = "implicit"\n', 'tls = "implicit"\n' + listener)
        toml = toml.replace('tls = "starttls"\n', 'tls = "starttls"\n' + listener)
        if access:  # its keys replace those of front_toml's [access]
            toml = toml.replace("[access]\n", "[access]\n" + access)
            toml = "\n".join(line for line in toml.split("\n")
                              if not line.startswith("trusted_networks = [\"127.0.0.0/8\"]")
                              or "access_trusted_networks" not in keys)
        toml += f"""
[upstream]
host = "localhost"
port = {demo_upstream.number}
ca_certificates = "{certificate[0]}"
timeout = 10

[credentials]
username = "{UPSTREAM_USER}"
password_file = "{tmp_path}/upstream-password"
"""
        bridge = start_bridge(reactor, toml, str(tmp_path))
        running.append(bridge)
        return bridge

    yield start
    for bridge in running:
        stop_bridge(reactor, bridge)


def normal_message(bridge: RunningBridge, certificate) -> float:
    """A trusted client's message over STARTTLS without AUTH; the seconds it took."""
    began = time.monotonic()
    with smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=10) as client:
        client.starttls(context=client_context(certificate))
        assert client.sendmail(SENDER, [RECIPIENT], MESSAGE) == {}
    return time.monotonic() - began


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the bridge sends until it closes the connection; fails after C{seconds}."""
    sock.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {seconds} s; got {received!r}")


def connect(bridge: RunningBridge, listener: str = "legacy",
            source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", bridge.ports[listener]))
    return sock


def read_reply(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


# 1. TLS that never finishes.

def test_a_silent_connection_on_the_implicit_tls_port_is_cut_off(hostile_bridge, certificate):
    bridge = hostile_bridge(handshake_timeout=1, idle_timeout=60)
    began = time.monotonic()
    with connect(bridge, "smtps") as sock:
        assert closed_within(sock, 5) == b""
    assert time.monotonic() - began < 4
    assert normal_message(bridge, certificate) < 2


@pytest.mark.parametrize("listener", ["smtps", "legacy"])
def test_a_tls_session_ends_at_once_after_quit(hostile_bridge, certificate, logged, listener):
    """A closing session reads on: TLS ends only once the client's close_notify (or its
    FIN) is read, so a session that said QUIT is not left to the 10 s cut-off."""
    bridge = hostile_bridge()
    if listener == "smtps":
        client = smtplib.SMTP_SSL("127.0.0.1", bridge.ports[listener], timeout=10,
                                  context=client_context(certificate))
    else:
        client = smtplib.SMTP("127.0.0.1", bridge.ports[listener], timeout=10)
        client.starttls(context=client_context(certificate))
    with client:
        assert client.noop()[0] == 250
    began = time.monotonic()
    while not any(" disconnect from " in line for line in logged):
        assert time.monotonic() - began < 5, logged[0::3]
        time.sleep(0.05)
    assert not any("did not close in time" in line for line in logged)


def test_starttls_then_nothing_is_cut_off(hostile_bridge):
    bridge = hostile_bridge(handshake_timeout=1, idle_timeout=60)
    with connect(bridge) as sock:
        assert read_reply(sock).startswith(b"220 ")
        sock.sendall(b"EHLO x\r\n")
        read_reply(sock)
        sock.sendall(b"STARTTLS\r\n")
        assert read_reply(sock).startswith(b"220 ")
        began = time.monotonic()
        closed_within(sock, 5)
        assert time.monotonic() - began < 4


def test_an_idle_tls_session_that_never_reads_is_closed_anyway(hostile_bridge, certificate):
    """The idle timeout's 421 cannot leave when the client does not read; the session is
    aborted after the grace period instead of staying open."""
    bridge = hostile_bridge(idle_timeout=1, handshake_timeout=5)
    context = client_context(certificate)
    raw = connect(bridge, "smtps")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"EHLO x\r\n" * 2000)  # replies pile up: the client reads nothing
        time.sleep(0.5)
        began = time.monotonic()
        tls.settimeout(20)
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            while tls.recv(65536):
                time.sleep(0.2)  # a slow reader
            raise ConnectionError("closed")
        assert time.monotonic() - began < 15


# 2. Connection limits.

def test_connections_per_listener_are_limited(hostile_bridge, certificate):
    bridge = hostile_bridge(max_connections=3, max_connections_per_client=50)
    held = [connect(bridge) for _ in range(3)]
    try:
        for sock in held:
            assert read_reply(sock).startswith(b"220 ")
        with connect(bridge) as extra:
            assert read_reply(extra).startswith(b"421 4.7.0 ")
            closed_within(extra, 5)
        # The limit is per listener: the other one takes clients.
        with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"], timeout=10,
                              context=client_context(certificate)) as other:
            assert other.noop()[0] == 250
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert normal_message(bridge, certificate) < 2  # the count went down again


def test_connections_per_client_address_are_limited(hostile_bridge, certificate):
    bridge = hostile_bridge(max_connections_per_client=2)
    held = [connect(bridge, source="127.0.0.1") for _ in range(2)]
    try:
        for sock in held:
            assert read_reply(sock).startswith(b"220 ")
        with connect(bridge, source="127.0.0.1") as extra:
            assert read_reply(extra).startswith(b"421 4.7.0 ")
        with connect(bridge, source="127.0.0.2") as another_client:
            assert read_reply(another_client).startswith(b"220 ")
    finally:
        for sock in held:
            sock.close()


def test_refused_silent_connections_take_no_ones_place(hostile_bridge, certificate):
    bridge = hostile_bridge(max_connections=4, max_connections_per_client=2)
    silent = [connect(bridge, "smtps", source="127.0.0.1") for _ in range(2)]
    # Over its address's limit, and more than the listener takes: each is dropped at
    # once (it never sent a ClientHello, so it could not read a 421 anyway).
    silent += [connect(bridge, "smtps", source="127.0.0.1") for _ in range(6)]
    try:
        for refused in silent[2:]:
            assert closed_within(refused, 5) == b""
        with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"], timeout=10,
                              context=client_context(certificate),
                              source_address=("127.0.0.2", 0)) as other:
            assert other.noop()[0] == 250
    finally:
        for sock in silent:
            sock.close()


def test_the_open_file_limit_is_raised_at_start(hostile_bridge):
    import resource

    hostile_bridge()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard


# 3. Slowloris.

def test_a_command_trickled_byte_by_byte_times_out(hostile_bridge, certificate):
    bridge = hostile_bridge(idle_timeout=2)
    with connect(bridge) as sock:
        assert read_reply(sock).startswith(b"220 ")
        began = time.monotonic()
        sock.settimeout(10)
        received = b""
        for byte in b"EHLO a-very-slow-client.example.com\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.25)
            if time.monotonic() - began > 6:
                break
        received = closed_within(sock, 6)
    assert received.startswith(b"421 4.4.2 "), received
    assert time.monotonic() - began < 5
    assert normal_message(bridge, certificate) < 2


def test_a_trickled_message_body_times_out_and_is_not_delivered(hostile_bridge, certificate,
                                                                demo_upstream):
    bridge = hostile_bridge(idle_timeout=2)
    with connect(bridge) as sock:
        read_reply(sock)
        for command in (b"EHLO x", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>",
                        b"DATA"):
            sock.sendall(command + b"\r\n")
            assert read_reply(sock)[:1] in (b"2", b"3")
        began = time.monotonic()
        try:
            while time.monotonic() - began < 8:
                sock.sendall(b"x" * 100 + b"\r\n")  # 200 bytes a second
                time.sleep(0.5)
        except OSError:
            pass
        received = closed_within(sock, 5)
    assert b"421 4.4.2 " in received
    assert time.monotonic() - began < 6
    assert demo_upstream.messages() == []


def test_sessions_end_after_max_session_time(hostile_bridge):
    bridge = hostile_bridge(max_session_time=2, idle_timeout=60)
    with connect(bridge) as sock:
        read_reply(sock)
        began = time.monotonic()
        replies = b""
        try:
            while time.monotonic() - began < 6:
                sock.sendall(b"NOOP\r\n")
                replies += read_reply(sock)
                time.sleep(0.3)
        except (OSError, AssertionError):
            pass
        replies += closed_within(sock, 5)
    assert b"421 4.4.2 " in replies
    assert time.monotonic() - began < 4


# 4. Replies buffered without limit.

def test_a_pipelining_client_that_never_reads_stops_being_read(hostile_bridge, certificate):
    """The bridge stops reading while the client leaves its replies unread: the client's
    sends block long before it could push tens of MiB of commands (each one a reply the
    bridge would otherwise hold)."""
    bridge = hostile_bridge(idle_timeout=30)
    sock = connect(bridge)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    chunk = b"NOOP\r\n" * 10000
    sent, stuck_since = 0, None
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and sent < 64 * 1024 * 1024:
            try:
                sent += sock.send(chunk)
                stuck_since = None
            except BlockingIOError:
                stuck_since = stuck_since or time.monotonic()
                if time.monotonic() - stuck_since > 1.5:
                    break
                time.sleep(0.01)
        assert stuck_since is not None, f"the bridge read all {sent} bytes"
        assert sent < 16 * 1024 * 1024, sent
        # Others are served meanwhile.
        assert normal_message(bridge, certificate) < 2
    finally:
        sock.close()


# 7. AUTH storms.

def test_parallel_guesses_from_one_address_respect_the_failure_limit(
        reactor, hostile_bridge, certificate):
    """Attempts are counted before their password is checked: 30 guesses at once from
    one address get at most auth_failure_limit checks."""
    bridge = hostile_bridge()
    from smtpbridge.listener import ListenerService

    factory = next(child.factory for child in bridge.service
                   if isinstance(child, ListenerService) and child.name.endswith("smtps"))
    factory = getattr(factory, "wrappedFactory", factory)
    checked: list[str] = []
    real = factory.checker

    class Counting:
        def check(self, username: str, password: str):
            checked.append(password)
            return real.check(username, password)

    factory.checker = Counting()
    context = client_context(certificate)
    sockets = []
    for _ in range(30):
        tls = context.wrap_socket(connect(bridge, "smtps"), server_hostname="localhost")
        read_reply(tls)
        tls.sendall(b"EHLO x\r\n")
        read_reply(tls)
        sockets.append(tls)
    for index, tls in enumerate(sockets):
        token = base64.b64encode(f"\0device\0wrong-{index}".encode())
        tls.sendall(b"AUTH PLAIN " + token + b"\r\n")
    replies = [read_reply(tls)[:3] for tls in sockets]
    for tls in sockets:
        tls.close()
    assert len(checked) <= 10, len(checked)
    assert replies.count(b"535") == len(checked)
    assert set(replies) <= {b"535", b"454"}


def test_an_address_refused_auth_is_cut_off_before_its_handshake(hostile_bridge,
                                                                  certificate):
    """After a 454 (here auth_rate), the guesser's next connections are closed as soon
    as they are accepted, for auth_cool_down seconds; trusted clients are not."""
    bridge = hostile_bridge(access_auth_rate=0.1,  # one costly check per 10 s
                            access_trusted_networks=["127.0.0.1/32", "127.0.0.2/32"])
    guess = "PLAIN " + base64.b64encode(b"\0device\0wrong").decode()
    for source, code in (("127.0.0.3", 535), ("127.0.0.3", 454), ("127.0.0.2", 454)):
        with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"], timeout=10,
                              context=client_context(certificate),
                              source_address=(source, 0)) as client:
            client.ehlo()
            assert client.docmd("AUTH", guess)[0] == code
    with connect(bridge, "smtps", source="127.0.0.3") as shed:
        assert closed_within(shed, 2) == b""  # no TLS handshake, no greeting
    with connect(bridge, "smtps", source="127.0.0.4") as other:  # another address
        tls = client_context(certificate).wrap_socket(other, server_hostname="localhost")
        assert read_reply(tls).startswith(b"220 ")
    trusted = client_context(certificate).wrap_socket(
        connect(bridge, "smtps", source="127.0.0.2"), server_hostname="localhost")
    with trusted:
        assert read_reply(trusted).startswith(b"220 ")  # refused too, but trusted
    assert normal_message(bridge, certificate) < 2


def test_the_password_checks_have_their_own_bounded_pool(hostile_bridge, certificate):
    bridge = hostile_bridge()
    from smtpbridge.limits import BoundedThreadPool

    [pool] = [child for child in bridge.service if isinstance(child, BoundedThreadPool)]
    assert pool._pool.max == 2 and pool._limit == 2 + 32
