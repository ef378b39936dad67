"""Behind a real HAProxy (PROXY protocol v2): two bridges, the device's own address in
trusted_networks, the log and Received:, and no session without a PROXY header.

The device connects from 127.0.0.2 and HAProxy reaches the bridges from 127.0.0.3 (both
loopback addresses), so the test can tell whose address the bridge saw.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import (
    PASSWORD,
    USER,
    RunningBridge,
    client_context,
    start_bridge,
    stop_bridge,
)
from tests.test_loopback import make_message, on_the_wire
from tests.test_relay import RECIPIENT, SENDER, relay_toml
from tests.upstream import Upstream, upstream

FIXTURES = (relay_toml, upstream)
DEVICE = "127.0.0.2"
HAPROXY_SOURCE = "127.0.0.3"
STRANGER = "127.0.0.4"

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (apt-get install haproxy)")


def free_port() -> int:
    """A port the OS picks, for HAProxy's configuration, which must name it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def behind_proxy(toml: str, hostname: str) -> str:
    """A test bridge's TOML with PROXY listeners, only the device's address trusted, and a
    short wait for the header."""
    toml = toml.replace('endpoint = "tcp:0:', 'endpoint = "haproxy:tcp:0:')
    toml = toml.replace('trusted_networks = ["127.0.0.0/8"]',
                        f'trusted_networks = ["{DEVICE}/32"]')
    return toml.replace('hostname = "localhost"', f'hostname = "{hostname}"\n'
                                                  'handshake_timeout = 2', 1)


@pytest.fixture
def bridges(reactor: Any, relay_toml: Callable[..., str], upstream: Upstream,
            tmp_path: Any) -> Iterator[list[RunningBridge]]:
    running = []
    for name in ("bridge-a", "bridge-b"):
        directory = tmp_path / name
        directory.mkdir()
        running.append(start_bridge(reactor, behind_proxy(relay_toml(upstream), name),
                                    str(directory)))
    yield running
    for bridge in running:
        stop_bridge(reactor, bridge)


@pytest.fixture
def haproxy(bridges: list[RunningBridge], tmp_path: Any) -> Iterator[dict[str, int]]:
    """HAProxy in TCP mode in front of both bridges; its port per listener name."""
    ports = {"legacy": free_port(), "smtps": free_port()}
    sections = ["global\n    maxconn 200\n",
                "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
                "    timeout server 30s\n"]
    for name, port in ports.items():
        servers = "".join(f"    server b{index} 127.0.0.1:{bridge.ports[name]} send-proxy-v2\n"
                          for index, bridge in enumerate(bridges))
        sections.append(f"frontend {name}\n    bind 127.0.0.1:{port}\n"
                        f"    default_backend {name}\n")
        sections.append(f"backend {name}\n    balance roundrobin\n"
                        f"    source {HAPROXY_SOURCE}\n{servers}")
    config = tmp_path / "haproxy.cfg"
    config.write_text("\n".join(sections))
    process = subprocess.Popen(["haproxy", "-db", "-f", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                socket.create_connection(("127.0.0.1", ports["smtps"]), timeout=1,
                                         source_address=(DEVICE, 0)).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy did not start listening"
                time.sleep(0.05)
        yield ports
    finally:
        process.terminate()
        process.communicate(timeout=15)


def device(port: int, source: str = DEVICE) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))


def test_mail_through_either_bridge_arrives_intact(haproxy: dict[str, int], upstream: Upstream,
                                                   logged: list[str]) -> None:
    messages = [make_message(2000 + 3000 * number, seed=number) for number in range(4)]
    for message in messages:
        with device(haproxy["legacy"]) as client:  # no AUTH: the device's network is trusted
            client.starttls()
            client.ehlo()
            assert client.sendmail(SENDER, [RECIPIENT], message) == {}
    stored = upstream.stored()
    assert [m.sent for m in stored] == [on_the_wire(message) for message in messages]
    received = [m.content[:m.content.index(b"\r\n\r\n")] for m in stored]
    assert {b"by bridge-a" in header for header in received} == {True, False}  # both served
    assert all(f"[{DEVICE}]".encode() in header for header in received)
    assert not any(HAPROXY_SOURCE.encode() in header for header in received)
    # The session heard that STARTTLS was done (its handshake deadline stopped, the TLS
    # version noted), through the PROXY header's wrapper.
    assert all(b"with ESMTPS (TLSv1." in header for header in received)
    sent = [line for line in logged[::3] if " status=sent " in line]
    assert len(sent) == 4 and all(f" client=[{DEVICE}]:" in line for line in sent)
    sessions = {line.split()[0] for line in sent}
    connects = dict(re.findall(r"^(\w+) connect from \[([\d.]+)\]", line)[0]
                    for line in logged[::3] if line.split()[0] in sessions
                    and " connect from [" in line)
    assert connects == {session: DEVICE for session in sessions}
    assert not [line for line in logged if f"[{HAPROXY_SOURCE}]" in line]


def test_implicit_tls_behind_haproxy(haproxy: dict[str, int], upstream: Upstream,
                                     certificate: tuple[str, str]) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", haproxy["smtps"], context=client_context(certificate),
                          timeout=30, source_address=(DEVICE, 0)) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(SENDER, [RECIPIENT], b"Subject: tls\r\n\r\nhi\r\n") == {}
    [stored] = upstream.stored()
    assert stored.sent == b"Subject: tls\r\n\r\nhi\r\n"
    assert f"[{DEVICE}]".encode() in stored.content.split(b"\r\n\r\n")[0]


def test_trusted_networks_see_the_real_address(haproxy: dict[str, int]) -> None:
    with device(haproxy["legacy"], source=STRANGER) as client:
        client.starttls()
        client.ehlo()
        code, text = client.mail(SENDER)
    assert (code, text[:5]) == (530, b"5.7.0")


def closed_without_a_word(sock: socket.socket) -> None:
    """The bridge drops the connection (a reset or a close) and sends nothing, no
    greeting either."""
    try:
        assert sock.recv(1024) == b""
    except ConnectionResetError:
        pass


def test_no_session_without_a_proxy_header(bridges: list[RunningBridge],
                                           logged: list[str]) -> None:
    port = bridges[0].ports["legacy"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as direct:
        direct.sendall(b"EHLO direct.example\r\n")
        closed_without_a_word(direct)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        started = time.monotonic()
        closed_without_a_word(silent)  # dropped after handshake_timeout
        assert 1.5 < time.monotonic() - started < 8
    assert any("dropped: no PROXY protocol header" in line for line in logged)
