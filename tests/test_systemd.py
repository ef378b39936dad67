"""systemd: the unit files pass systemd-analyze, the bridge says READY=1 once it listens
(and STOPPING=1), and it runs from sockets systemd hands it."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from smtpbridge.sdnotify import notify
from tests.conftest import client_context, start_bridge, stop_bridge, stored_messages
from tests.test_twistd import TWISTD, demo_copy, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(ROOT, "etc", "systemd")


@pytest.fixture
def notify_socket(tmp_path: Any) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, bound at tmp_path/notify."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(30)
        yield sock


def test_notify_speaks_the_protocol(notify_socket: socket.socket) -> None:
    assert notify("READY=1", {"NOTIFY_SOCKET": notify_socket.getsockname()})
    assert notify_socket.recv(4096) == b"READY=1"


def test_notify_abstract_socket() -> None:
    name = f"smtpbridge-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_no_systemd_no_notification() -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"})


def test_ready_once_listening_and_stopping(reactor: Any, bridge_config: str, tmp_path: Any,
                                           notify_socket: socket.socket,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    running = start_bridge(reactor, bridge_config, str(tmp_path))
    try:
        assert notify_socket.recv(4096).split(b"\n")[0] == b"READY=1"
        for port in running.ports.values():
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        stop_bridge(reactor, running)
    assert notify_socket.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("workers", [1, 2])
def test_twistd_tells_systemd(tmp_path: Any, notify_socket: socket.socket,
                              workers: int) -> None:
    """READY=1 once every listener listens (with workers: from the supervisor, the unit's
    main process, once it started them), STOPPING=1 at the stop."""
    path = demo_copy(tmp_path)
    text = open(path, encoding="utf-8").read()
    open(path, "w", encoding="utf-8").write(
        text.replace("[server]\n", f"[server]\nworkers = {workers}\n", 1))
    environment = dict(os.environ, NOTIFY_SOCKET=notify_socket.getsockname())
    process = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "smtpbridge", "--config",
                                path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=environment)
    try:
        assert notify_socket.recv(4096).startswith(b"READY=1")
        lines = []
        while len(lines) < 3:  # READY came after every listener was up
            line = process.stdout.readline() if process.stdout else ""
            assert line, "twistd ended"
            lines += re.findall(r"listening on 127\.0\.0\.1:(\d+)", line)
        with socket.create_connection(("127.0.0.1", int(lines[0])), timeout=10):
            pass
        process.terminate()
        assert notify_socket.recv(4096) == b"STOPPING=1"
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed (apt-get install systemd)")
def test_socket_activation(tmp_path: Any) -> None:
    path = demo_copy(tmp_path)
    text = open(path, encoding="utf-8").read()
    text = re.sub(r'(name = "smtps"\nendpoint = )"[^"]*"', r'\1"systemd:domain=INET:index=0"',
                  text)
    open(path, "w", encoding="utf-8").write(text)
    port = free_port()
    # As smtpbridge.socket does: the descriptors come named (systemd names them after the
    # socket unit), and the listener takes the first by its index.
    process = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
                                "--fdname=smtpbridge.socket", TWISTD,
                                "--nodaemon", "--pidfile=", "smtpbridge", "--config", path],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cert = tmp_path / "var" / "tls" / "cert.pem"
    try:
        deadline = time.monotonic() + 30
        while True:  # systemd-socket-activate listens; the bridge starts at the first client
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        while not cert.exists():  # the bridge made its certificate: it is starting
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=30,
                                  context=client_context((str(cert), "")))
        with client:
            client.login("device", "device")
            client.sendmail("printer@example.com", ["office@example.com"],
                            b"Subject: activated\r\n\r\nhi\r\n")
        assert stored_messages(str(tmp_path / "var" / "mail")) == [
            b"Subject: activated\r\n\r\nhi\r\n"]
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_the_unit_is_hardened() -> None:
    with open(os.path.join(UNITS, "smtpbridge.service"), encoding="utf-8") as f:
        unit = f.read()
    for line in ("Type=notify", "User=smtpbridge", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "StateDirectory=smtpbridge"):
        assert re.search(rf"^{re.escape(line)}$", unit, re.MULTILINE), line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt-get install systemd)")
def test_systemd_analyze_verifies_the_units(tmp_path: Any) -> None:
    names = ["smtpbridge.service", "smtpbridge.socket"]
    bin_dir = os.path.dirname(TWISTD)
    for name in names:  # where the units expect the bridge, this checkout's is used
        with open(os.path.join(UNITS, name), encoding="utf-8") as f:
            text = f.read().replace("/opt/smtpbridge/bin/", bin_dir + "/")
        (tmp_path / name).write_text(text, encoding="utf-8")
    result = subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / n) for n in names]],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
