"""``smtpbridge check``: the configuration, then a real upstream handshake, step by step."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

from tests.upstream import Upstream, upstream, upstream_factory

FIXTURES = (upstream, upstream_factory)
SMTPBRIDGE = os.path.join(os.path.dirname(sys.executable), "smtpbridge")


def config_for(tmp_path, up: Upstream, password: str | None = None) -> str:
    (tmp_path / "upstream-password").write_text((password or up.password) + "\n")
    path = tmp_path / "check.toml"
    path.write_text(f"""
[server]
hostname = "bridge.test"

[[listener]]
name = "plain"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
auth = "optional"

[upstream]
host = "{up.host}"
port = {up.port}
tls = "{up.tls}"
ca_certificates = "{up.ca_file}"
timeout = 10

[credentials]
username = "{up.username}"
password_file = "upstream-password"
""")
    return str(path)


def check(path: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([SMTPBRIDGE, "check", "--config", path, *extra], capture_output=True,
                          text=True, timeout=60)


def test_a_good_upstream_passes_every_step(tmp_path, upstream):
    result = check(config_for(tmp_path, upstream))
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("  ok")]
    assert steps == ["connect", "greeting", "EHLO", "TLS", "AUTH", "QUIT"]
    assert "certificate verified for localhost" in result.stdout
    assert result.stdout.rstrip().endswith("PASS: the upstream accepts the bridge")
    assert upstream.logins == [("PLAIN", upstream.username, True)]


def test_a_wrong_password_fails_without_showing_it(tmp_path, upstream):
    wrong = "wrong-secret-42"
    result = check(config_for(tmp_path, upstream, password=wrong))
    assert result.returncode == 1
    assert "FAIL  454 4.7.0" in result.stdout and upstream.username in result.stdout
    output = result.stdout + result.stderr
    for secret in (wrong, base64.b64encode(wrong.encode()).decode(),
                   base64.b64encode(f"\0{upstream.username}\0{wrong}".encode()).decode()):
        assert secret not in output


def test_a_certificate_for_another_host_fails(tmp_path, upstream_factory):
    up = upstream_factory(certificate_names=["wrong.example"])
    result = check(config_for(tmp_path, up))
    assert result.returncode == 1
    assert "FAIL  454 4.7.5" in result.stdout
    assert "certificate does not match host localhost" in result.stdout
    assert "AUTH" not in result.stdout.split("FAIL")[0]


def test_config_only_and_broken_config(tmp_path, upstream):
    path = config_for(tmp_path, upstream)
    result = check(path, "--config-only")
    assert (result.returncode, result.stdout) == (0, f"config ok: {path}\n")
    assert upstream.logins == []
    text = open(path).read().replace('hostname = "bridge.test"', "hostname = 1")
    open(path, "w").write(text)
    result = check(path)
    assert result.returncode == 1
    assert result.stderr == (f"smtpbridge: {path}: server.hostname: expected a string, "
                             "got an integer\n")
