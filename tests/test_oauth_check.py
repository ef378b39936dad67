"""``smtpbridge check`` and ``twistd smtpbridge`` with OAuth2 accounts: the token file and
its directory (refused in one line when the bridge's user cannot replace the file), and
how the client authenticates (a client assertion for a refresh token included), against
the local token endpoint and the upstream that takes only tokens."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from smtpbridge.tls import create_self_signed
from tests.oauth_upstream import CLIENT_ID, USERNAME, Provider, secrets_now, start_provider

BIN = os.path.dirname(sys.executable)
# Root passes every permission check: the commands run without that power, as the
# unprivileged bridge would (setpriv drops the capabilities that bypass file modes).
AS_THE_BRIDGE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                 "--inh-caps", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
USER = pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def provider(reactor: Any, certificate: tuple[str, str], tmp_path: Any) -> Iterator[Provider]:
    running = start_provider(reactor, certificate, str(tmp_path / "provider"))
    yield running
    running.stop()


def write_config(provider: Provider, directory: Any, oauth_extra: str = "",
                 with_secret: bool = True) -> str:
    """A configuration with the account "scans" (refresh token), its files in
    C{directory}/state; the path of the configuration."""
    state = directory / "state"
    state.mkdir(exist_ok=True)
    (state / "refresh-token").write_text(next(iter(provider.refresh_tokens)) + "\n")
    (state / "refresh-token").chmod(0o600)
    secret = ""
    if with_secret:
        (directory / "client-secret").write_text(f"{provider.client_secret}\n")
        secret = f'client_secret_file = "{directory}/client-secret"\n'
    path = directory / "check.toml"
    path.write_text(f"""
[server]
hostname = "bridge.test"

[[listener]]
name = "plain"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
auth = "optional"

[upstream]
host = "localhost"
port = {provider.upstream_port}
ca_certificates = "{provider.ca_file}"
timeout = 20

[account.scans]
username = "{USERNAME}"
mechanism = "xoauth2"

[account.scans.oauth]
grant = "refresh_token"
token_url = "{provider.token_url}"
client_id = "{CLIENT_ID}"
{secret}refresh_token_file = "{state}/refresh-token"
ca_certificates = "{provider.endpoint_ca}"
timeout = 10
{oauth_extra}
[credentials]
mapper = "static"
account = "scans"
""")
    return str(path)


def run(command: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*AS_THE_BRIDGE, *command], capture_output=True, text=True,
                            timeout=timeout, check=False)
    output = result.stdout + result.stderr
    assert not [s for s in secrets_now() if s in output]
    return result


def check(path: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run([os.path.join(BIN, "smtpbridge"), "check", "--config", path, *extra])


def steps(stdout: str) -> list[tuple[str, str]]:
    """(step, detail) of every "ok" line."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^  ok    (\S+) +(.*)$", stdout,
                                                          re.MULTILINE)]


def test_check_shows_the_grant_and_the_token_file(provider, tmp_path):
    result = check(write_config(provider, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    state = tmp_path / "state"
    assert steps(result.stdout)[:3] == [
        ("grant", "refresh_token with a client secret"),
        ("token", f"refresh token file {state}/refresh-token readable, its directory "
                  f"writable by {USER}"),
        ("token", "OAuth2 access token obtained")]
    assert [step for step, _ in steps(result.stdout)][3:] == [
        "connect", "greeting", "EHLO", "TLS", "AUTH", "QUIT"]


def test_check_shows_a_client_assertion_for_a_refresh_token(provider, tmp_path):
    client = (str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    create_self_signed(*client, "smtpbridge-client")
    provider.client_secret, provider.assertion_certificate = None, client[0]
    path = write_config(provider, tmp_path, f'client_certificate = "{client[0]}"\n'
                                            f'client_key = "{client[1]}"\n', with_secret=False)
    result = check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert steps(result.stdout)[0] == (
        "grant", f"refresh_token with a client assertion (certificate {client[0]})")
    assert "client_assertion" in provider.request_list()[0]


def test_a_certificate_and_a_secret_are_refused_in_one_line(provider, tmp_path):
    path = write_config(provider, tmp_path, 'client_certificate = "c.pem"\n'
                                            'client_key = "c.key"\n')
    result = check(path, "--config-only")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"smtpbridge: {path}: account.scans.oauth.client_secret: give "
                             "client_secret_file/_env, or client_certificate and client_key, "
                             "not both\n")
    assert provider.request_list() == []


def test_a_directory_the_bridge_cannot_write_is_refused(provider, tmp_path):
    """The bridge's user must replace the rotated token in that directory: `check` and
    the start refuse the configuration, saying what to do, before any token request."""
    path = write_config(provider, tmp_path)
    state = tmp_path / "state"
    state.chmod(0o555)
    try:
        result = check(path)
        started = run([os.path.join(BIN, "twistd"), "--nodaemon", "--pidfile=",
                       "smtpbridge", "--config", path], timeout=30)
    finally:
        state.chmod(0o700)
    reason = (f"account.scans.oauth.refresh_token_file: the directory {state} is not "
              f"writable by {USER}, who must replace the rotated refresh token there: "
              f"chown {USER} {state}, or keep the file in the state directory "
              f"/var/lib/smtpbridge/ owned by {USER}")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"smtpbridge: {path}: {reason}\n"
    assert started.returncode == 1
    assert started.stderr.strip().splitlines() == [
        f"smtpbridge: configuration error: {path}: {reason}"]
    assert provider.request_list() == []


def test_an_unreadable_token_file_is_refused(provider, tmp_path):
    path = write_config(provider, tmp_path)
    token = tmp_path / "state" / "refresh-token"
    token.chmod(0o000)
    result = check(path, "--config-only")
    assert result.returncode == 1
    assert result.stderr == (f"smtpbridge: {path}: account.scans.oauth.refresh_token_file: "
                             f"{token} is not a file {USER} can read: chown {USER} {token}, "
                             f"or run smtpbridge oauth-login as {USER} (or with --owner "
                             f"{USER})\n")
