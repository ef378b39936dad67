"""``twistd smtpbridge`` as an administrator runs it: start-up, config errors, the demo."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import time

from tests.conftest import client_context, stored_messages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def twistd(config: str, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "smtpbridge", "--config", config,
                           *extra], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A port the OS picks, for the one place a configuration must name it in advance."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_copy(tmp_path) -> str:
    """etc/demo.toml with OS-picked ports and its files under tmp_path."""
    for name in ("demo-users", "demo-password"):
        shutil.copy(os.path.join(ROOT, "etc", name), tmp_path / name)
    with open(os.path.join(ROOT, "etc", "demo.toml"), encoding="utf-8") as f:
        text = f.read()
    upstream = free_port()
    text = text.replace('endpoint = "tcp:10587:', f'endpoint = "tcp:{upstream}:')
    text = text.replace("port = 10587", f"port = {upstream}")
    text = re.sub(r'endpoint = "tcp:1?\d{4}:', 'endpoint = "tcp:0:', text)
    text = text.replace("../var/demo", "var")
    path = tmp_path / "demo.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "missing.toml")
    line = one_line_error(twistd(path))
    assert line == (f"smtpbridge: configuration error: {path}: cannot read configuration: "
                    "No such file or directory")


def test_a_log_file_that_cannot_be_written(tmp_path):
    path = demo_copy(tmp_path)
    result = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", f"--logfile={tmp_path}",
                             "smtpbridge", "--config", path],
                            capture_output=True, text=True, timeout=30)
    line = one_line_error(result)
    assert line == f"smtpbridge: cannot write the log: {tmp_path}: Is a directory"


def test_unknown_key_and_wrong_type(tmp_path):
    path = demo_copy(tmp_path)
    text = open(path, encoding="utf-8").read()
    text = text.replace('hostname = "localhost"', 'hostname = "localhost"\nidle_timout = 30')
    open(path, "w", encoding="utf-8").write(text)
    line = one_line_error(twistd(path))
    assert line == f"smtpbridge: configuration error: {path}: server.idle_timout: unknown key"

    text = open(path, encoding="utf-8").read().replace("idle_timout = 30", "idle_timeout = '30'")
    open(path, "w", encoding="utf-8").write(text)
    line = one_line_error(twistd(path))
    assert line.endswith(f"{path}: server.idle_timeout: expected an integer, got a string")


def test_unreadable_certificate(tmp_path):
    path = demo_copy(tmp_path)
    (tmp_path / "var" / "demo" / "tls").mkdir(parents=True)
    (tmp_path / "var" / "tls").mkdir(parents=True)
    (tmp_path / "var" / "tls" / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "var" / "tls" / "key.pem").write_text("not a key\n")
    line = one_line_error(twistd(path))
    assert line.endswith(f"{path}: tls.certificate: {tmp_path}/var/tls/cert.pem "
                         "holds no usable PEM certificate")


def test_port_in_use(tmp_path):
    path = demo_copy(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = open(path, encoding="utf-8").read().replace(
            'endpoint = "tcp:0:interface=127.0.0.1"',
            f'endpoint = "tcp:{port}:interface=127.0.0.1"', 1)
        open(path, "w", encoding="utf-8").write(text)
        line = one_line_error(twistd(path))
    assert line.startswith(f"smtpbridge: cannot listen on tcp:{port}:interface=127.0.0.1:")


def test_demo_starts_and_stores_mail(tmp_path):
    path = demo_copy(tmp_path)
    process = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "--logfile=-",
                                "smtpbridge", "--config", path],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 30
        log = []
        while len(ports) < 3 and time.monotonic() < deadline:
            line = process.stdout.readline()
            log.append(line)
            found = re.search(r"(listener \w+|demo upstream) listening on 127.0.0.1:(\d+)", line)
            if found:
                ports[found.group(1)] = int(found.group(2))
        assert len(ports) == 3, "".join(log)
        cert = tmp_path / "var" / "tls" / "cert.pem"
        assert cert.exists()
        context = client_context((str(cert), ""))
        with smtplib.SMTP_SSL("127.0.0.1", ports["listener smtps"], context=context,
                              timeout=30) as client:
            client.login("device", "device")
            message = b"Subject: demo\r\n\r\nhello from the demo\r\n"
            client.sendmail("printer@example.com", ["office@example.com"], message)
        assert stored_messages(str(tmp_path / "var" / "mail")) == [message]
    finally:
        process.terminate()
        process.wait(30)


def test_a_secret_file_others_can_read_is_refused(tmp_path):
    path = demo_copy(tmp_path)
    users = tmp_path / "demo-users"
    users.chmod(0o644)
    line = one_line_error(twistd(path))
    assert line == (f"smtpbridge: configuration error: {path}: access.users_file: {users} "
                    f"can be read by its group and others (mode 0644): chmod 600 {users} "
                    "(or set [server] allow_readable_secrets = true)")
