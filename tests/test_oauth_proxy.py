"""The token endpoint through a real HTTP proxy (tinyproxy on loopback): the bridge opens a
CONNECT tunnel, still verifies the endpoint's certificate, and says which proxy failed;
the ``proxy`` key, HTTPS_PROXY with credentials, and NO_PROXY."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from tests.conftest import front_toml, start_bridge, stop_bridge, without_bridge_trace
from tests.oauth_upstream import (
    CLIENT_ID,
    USERNAME,
    ForwardProxy,
    Provider,
    secrets_now,
    start_provider,
    start_proxy,
)

pytestmark = pytest.mark.skipif(shutil.which("tinyproxy") is None,
                                reason="tinyproxy is not installed")

SMTPBRIDGE = os.path.join(os.path.dirname(sys.executable), "smtpbridge")
PROXY_USER, PROXY_PASSWORD = "bridge", "proxy-pass-7f3a"
SENDER, RECIPIENT = "scanner@example.com", "office@example.com"
MESSAGE = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: scan\r\n\r\npage\r\n").encode()


@pytest.fixture(autouse=True)
def no_secret_logged() -> Iterator[list[dict]]:
    """The test's log events: none may hold a secret of the provider or the proxy's
    password."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(event) + repr(event) for event in list(events)]
    leaked = [s[:12] for s in (*secrets_now(), PROXY_PASSWORD) for t in texts if s in t]
    assert not leaked, leaked


@pytest.fixture
def provider(reactor: Any, certificate: tuple[str, str], tmp_path: Any) -> Iterator[Provider]:
    running = start_provider(reactor, certificate, str(tmp_path / "provider"))
    yield running
    running.stop()


@pytest.fixture
def proxies(tmp_path: Any) -> Iterator[Any]:
    """Starts tinyproxy instances: C{proxies(credentials=None)}."""
    started: list[ForwardProxy] = []

    def start(credentials: tuple[str, str] | None = None) -> ForwardProxy:
        started.append(start_proxy(str(tmp_path / f"proxy-{len(started)}"), credentials))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


def bridge_toml(provider: Provider, directory: Any, oauth_extra: str = "",
                trust_endpoint: bool = True) -> str:
    """The upstream side: the account "scans" with a refresh token and a client secret."""
    directory.mkdir(exist_ok=True)
    (directory / "client-secret").write_text(f"{provider.client_secret}\n")
    (directory / "refresh-token").write_text(next(iter(provider.refresh_tokens)) + "\n")
    ca = f'ca_certificates = "{provider.endpoint_ca}"\n' if trust_endpoint else ""
    return f"""
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
client_secret_file = "{directory}/client-secret"
refresh_token_file = "{directory}/refresh-token"
{ca}timeout = 10
{oauth_extra}
[credentials]
mapper = "static"
account = "scans"
"""


def mail(port: int) -> tuple[int, str] | None:
    """Send one message from a trusted device: None, or the (code, text) of a refusal."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        try:
            client.sendmail(SENDER, [RECIPIENT], MESSAGE)
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error.decode()
    return None


@pytest.fixture
def bridge_with(reactor: Any, certificate: tuple[str, str], users_file: str,
                tmp_path: Any) -> Iterator[Any]:
    """Starts a bridge with C{bridge_with(upstream_toml)}; its legacy listener's port."""
    running: list[Any] = []

    def start(upstream_toml: str) -> int:
        directory = tmp_path / f"bridge-{len(running)}"
        directory.mkdir()
        toml = front_toml(certificate, users_file) + upstream_toml
        running.append(start_bridge(reactor, toml, str(directory)))
        return int(running[-1].ports["legacy"])

    yield start
    for bridge in running:
        stop_bridge(reactor, bridge)


def logged(events: list[dict]) -> str:
    return "\n".join(formatEvent(event) or "" for event in list(events))


def test_the_token_request_goes_through_the_proxy(provider, proxies, bridge_with, tmp_path,
                                                 no_secret_logged):
    proxy = proxies()
    port = bridge_with(bridge_toml(provider, tmp_path / "secrets",
                                   f'proxy = "http://127.0.0.1:{proxy.port}"\n'))
    assert mail(port) is None
    assert proxy.tunnels() == [provider.endpoint_host]  # CONNECT localhost:PORT, nothing else
    assert len(provider.request_list()) == 1
    [(_, _, content)] = provider.message_list()
    assert without_bridge_trace(content) == MESSAGE
    assert (f"OAuth2 token for {CLIENT_ID} from {provider.endpoint_host}: expires in 3600 s "
            f"through the proxy {proxy.name}") in logged(no_secret_logged)


def test_a_stopped_proxy_is_named_and_the_endpoint_not_asked(provider, proxies, bridge_with,
                                                             tmp_path):
    proxy = proxies()
    port = bridge_with(bridge_toml(provider, tmp_path / "secrets",
                                   f'proxy = "http://127.0.0.1:{proxy.port}"\n'))
    proxy.stop()
    code, text = mail(port) or (0, "")
    assert code == 454
    assert text.startswith(f"4.7.0 OAuth2 token request to {provider.endpoint_host} failed: "
                           f"unreachable: the proxy {proxy.name} is unreachable: "), text
    assert provider.request_list() == []


def test_the_endpoint_certificate_is_verified_through_the_tunnel(provider, proxies,
                                                                 bridge_with, tmp_path):
    proxy = proxies()
    port = bridge_with(bridge_toml(provider, tmp_path / "secrets",
                                   f'proxy = "http://127.0.0.1:{proxy.port}"\n',
                                   trust_endpoint=False))
    code, text = mail(port) or (0, "")
    assert code == 454
    assert "unreachable: TLS failed: " in text and "certificate verify failed" in text, text
    assert proxy.tunnels() == [provider.endpoint_host]
    assert provider.request_list() == []


def check(path: Any, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items()
           if key.lower() not in ("https_proxy", "no_proxy")}
    result = subprocess.run([SMTPBRIDGE, "check", "--config", str(path)], capture_output=True,
                            text=True, timeout=60, env={**env, **environment})
    output = result.stdout + result.stderr
    assert PROXY_PASSWORD not in output
    assert not [s for s in secrets_now() if s in output]
    return result


def check_config(provider: Provider, tmp_path: Any) -> Any:
    path = tmp_path / "check.toml"
    path.write_text('[server]\nhostname = "bridge.test"\n\n[[listener]]\nname = "plain"\n'
                    'endpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\nauth = "optional"\n'
                    + bridge_toml(provider, tmp_path / "secrets"))
    return path


def test_https_proxy_with_credentials_from_the_environment(provider, proxies, tmp_path):
    proxy = proxies(credentials=(PROXY_USER, PROXY_PASSWORD))
    path = check_config(provider, tmp_path)
    result = check(path, {"HTTPS_PROXY": proxy.url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^  ok    proxy     token endpoint through {re.escape(proxy.name)} "
                     r"\(from HTTPS_PROXY\)$", result.stdout, re.MULTILINE), result.stdout
    assert proxy.tunnels() == [provider.endpoint_host]
    wrong = proxy.url.replace(PROXY_PASSWORD, "wrong-password")
    result = check(path, {"HTTPS_PROXY": wrong})
    assert result.returncode == 1
    assert re.search(rf"FAIL  454 4\.7\.0 OAuth2 token request to {provider.endpoint_host} "
                     rf"failed: unreachable: the proxy {re.escape(proxy.name)} refused the "
                     r"tunnel: 40[17] ", result.stdout), result.stdout
    assert "wrong-password" not in result.stdout + result.stderr
    assert len(provider.request_list()) == 1


def test_no_proxy_exempts_the_endpoint(provider, proxies, tmp_path):
    proxy = proxies()
    result = check(check_config(provider, tmp_path),
                   {"HTTPS_PROXY": proxy.url, "NO_PROXY": "example.net,localhost"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert " proxy " not in result.stdout
    assert proxy.tunnels() == []
    assert len(provider.request_list()) == 1
