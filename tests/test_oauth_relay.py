"""OAuth2 relay, end to end: smtplib -> the bridge -> an upstream that takes only tokens.

The provider of L{tests.oauth_upstream} plays Gmail or Microsoft 365: a token
endpoint over HTTPS and an upstream offering only XOAUTH2 and OAUTHBEARER, which
accepts only tokens that endpoint issued, unexpired and unrevoked.  The bridge
fetches, caches, shares, refreshes and drops tokens; the endpoint's record of
requests and the upstream's record of logins and messages are the evidence.
Every test ends with a scan of the log events it caused and the replies clients
got: no client secret, refresh token, access token or SASL response may appear.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attr
import pytest
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import eventAsText, formatEvent, globalLogPublisher

from smtpbridge.config import parse_config
from smtpbridge.oauth import token_keepalive
from smtpbridge.service import token_sources
from smtpbridge.tls import create_self_signed
from tests.conftest import (
    PASSWORD,
    USER,
    RunningBridge,
    client_context,
    front_toml,
    start_bridge,
    stop_bridge,
    without_bridge_trace,
)
from tests.oauth_upstream import (
    CLIENT_ID,
    INVALID_GRANT,
    NO_CREDENTIAL,
    REJECTED,
    USERNAME,
    Provider,
    secrets_now,
    start_provider,
)

SENDER = "scanner@example.com"
RECIPIENT = "office@example.com"
M365_SCOPE = "https://outlook.office365.com/.default"
M365_DELEGATED_SCOPE = "https://outlook.office.com/SMTP.Send offline_access"
SMTPBRIDGE = os.path.join(os.path.dirname(sys.executable), "smtpbridge")
REPLIES: list[str] = []  # every reply text a client got: scanned for secrets too

Relay = Callable[..., RunningBridge]


# Fixtures.

@pytest.fixture(autouse=True)
def no_secret_logged() -> Iterator[list[dict]]:
    """The log events of the test: after it, none (formatted, as text, or any of its
    fields) and no reply a client got may hold a secret of the provider."""
    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    del REPLIES[:]
    yield events
    globalLogPublisher.removeObserver(observer)
    texts = list(REPLIES)
    for event in list(events):
        texts += [formatEvent(event), eventAsText(event, includeTraceback=True)]
        texts += [repr(value) for value in event.values()]
    found = sorted({f"{s[:12]}... in {t[:200]!r}" for s in secrets_now() for t in texts
                    if s in t})
    assert not found, found


@pytest.fixture
def provider(reactor: Any, certificate: tuple[str, str], tmp_path: Any) -> Iterator[Provider]:
    running = start_provider(reactor, certificate, str(tmp_path / "provider"))
    yield running
    running.stop()


def refresh_grant(provider: Provider, directory: str, timeout: float = 10) -> str:
    """The [account.scans.oauth] table for Gmail: refresh token and client secret files."""
    return f"""grant = "refresh_token"
provider = "google"
token_url = "{provider.token_url}"
client_id = "{CLIENT_ID}"
client_secret_file = "{directory}/client-secret"
refresh_token_file = "{directory}/refresh-token"
ca_certificates = "{provider.endpoint_ca}"
timeout = {timeout}
"""


def client_credentials_grant(provider: Provider, directory: str) -> str:
    """The [account.scans.oauth] table for Microsoft 365 application access."""
    return f"""grant = "client_credentials"
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
token_url = "{provider.token_url}"
client_id = "{CLIENT_ID}"
client_secret_file = "{directory}/client-secret"
scope = "{M365_SCOPE}"
ca_certificates = "{provider.endpoint_ca}"
timeout = 10
"""


def write_secrets(provider: Provider, directory: str) -> None:
    """The client secret and refresh token files, as an administrator writes them."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "client-secret"), "w") as f:
        f.write(f"{provider.client_secret}\n")
    path = os.path.join(directory, "refresh-token")
    with open(path, "w") as f:
        f.write(f"{next(iter(provider.refresh_tokens))}\n")
    os.chmod(path, 0o600)


def account_toml(provider: Provider, directory: str, mechanism: str,
                 grant: Callable[[Provider, str], str], session_idle: int = 30) -> str:
    return f"""
[upstream]
host = "localhost"
port = {provider.upstream_port}
ca_certificates = "{provider.ca_file}"
timeout = 20
session_idle = {session_idle}

[account.scans]
username = "{USERNAME}"
mechanism = "{mechanism}"

[account.scans.oauth]
{grant(provider, directory)}
[credentials]
mapper = "static"
account = "scans"
"""


@pytest.fixture
def relay(reactor: Any, provider: Provider, certificate: tuple[str, str], users_file: str,
          tmp_path: Any) -> Iterator[Relay]:
    """Starts bridges relaying to the provider's upstream with the account "scans";
    C{relay(mechanism=..., grant=..., session_idle=...)}.  Listeners: "smtps" (implicit
    TLS, AUTH required) and "legacy" (STARTTLS offered, 127.0.0.0/8 needs no AUTH)."""
    running: list[RunningBridge] = []

    def start(mechanism: str = "xoauth2", grant: Callable[[Provider, str], str] = refresh_grant,
              session_idle: int = 30) -> RunningBridge:
        directory = tmp_path / f"bridge-{len(running)}"
        secrets_dir = str(directory / "secrets")
        write_secrets(provider, secrets_dir)
        toml = front_toml(certificate, users_file) + account_toml(
            provider, secrets_dir, mechanism, grant, session_idle)
        running.append(start_bridge(reactor, toml, str(directory)))
        return running[-1]

    yield start
    for bridge in running:
        stop_bridge(reactor, bridge)


# Helpers.

def message(index: int) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: scan {index}\r\n"
            f"Message-ID: <scan-{index}@example.com>\r\n\r\npage {index}\r\n").encode()


def send(bridge: RunningBridge, index: int) -> None:
    """One message from a trusted device on the legacy listener; it must be accepted."""
    with smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=30) as client:
        assert client.sendmail(SENDER, [RECIPIENT], message(index)) == {}


def send_together(bridge: RunningBridge, indexes: range) -> list[Any]:
    """Messages from as many devices at once; what each C{sendmail} returned or raised."""
    barrier = threading.Barrier(len(indexes))
    results: dict[int, Any] = {}

    def device(index: int) -> None:
        try:
            barrier.wait(10)
            with smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=30) as client:
                results[index] = client.sendmail(SENDER, [RECIPIENT], message(index))
        except Exception as e:  # noqa: BLE001 - reported by the caller's assertion
            results[index] = e

    threads = [threading.Thread(target=device, args=(i,)) for i in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return [results.get(i) for i in indexes]


def refused_at_mail(bridge: RunningBridge) -> tuple[int, str]:
    """The reply to MAIL FROM of a message the bridge refuses there: (code, text)."""
    with smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=30) as client, \
            pytest.raises(smtplib.SMTPSenderRefused) as caught:
        client.sendmail(SENDER, [RECIPIENT], message(999))
    text = caught.value.smtp_error.decode()
    REPLIES.append(text)
    return caught.value.smtp_code, text


def arrived(provider: Provider) -> list[bytes]:
    """The messages the upstream stored, as the devices sent them, sorted."""
    stored = provider.message_list()
    assert all((sender, recipients) == (SENDER, [RECIPIENT])
               for sender, recipients, _ in stored)
    return sorted(without_bridge_trace(content) for _, _, content in stored)


def logins(provider: Provider) -> list[tuple[str, str, str, bool]]:
    """(mechanism, user, token, accepted) of every AUTH the upstream saw."""
    return [(login.mechanism, login.user, login.token, login.accepted)
            for login in provider.login_list()]


def logged(events: list[dict]) -> str:
    return "\n".join(formatEvent(event) for event in list(events))


def wait_until(moment: float) -> None:
    time.sleep(max(moment - time.time(), 0.0))


# 1. Both mechanisms, and "auto".

@pytest.mark.parametrize(("mechanism", "used"), [
    ("xoauth2", "XOAUTH2"), ("oauthbearer", "OAUTHBEARER"), ("auto", "XOAUTH2")])
def test_a_message_goes_through_with_a_token(relay, provider, certificate, no_secret_logged,
                                             mechanism, used):
    refresh = next(iter(provider.refresh_tokens))
    bridge = relay(mechanism=mechanism)
    with smtplib.SMTP_SSL("127.0.0.1", bridge.ports["smtps"],
                          context=client_context(certificate), timeout=30) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(SENDER, [RECIPIENT], message(1)) == {}
    assert arrived(provider) == [message(1)]
    [token] = provider.issued_tokens()
    assert logins(provider) == [(used, USERNAME, token, True)]
    [login] = provider.login_list()
    if used == "OAUTHBEARER":
        assert (login.host, login.port) == ("localhost", str(provider.upstream_port))
    assert provider.request_list() == [{"grant_type": "refresh_token", "refresh_token": refresh,
                                        "client_id": CLIENT_ID,
                                        "client_secret": provider.client_secret}]
    # The observer sees the bridge's own lines (so the scan after the test means something).
    assert f"OAuth2 token for {CLIENT_ID} from {provider.endpoint_host}: expires in 3600 s" \
        in logged(no_secret_logged)


# 2. Reuse, and a refresh shortly before expiry.

def test_a_token_is_reused_then_refreshed_before_it_expires(relay, provider):
    """A token living 8 s is reused for nine tenths of its life (the margin is
    min(300 s, lifetime / 10): 12 s for a 120 s token, 0.8 s here), then replaced
    before it expires.  The upstream refuses expired tokens, so a token used too long
    would show as a refused login."""
    provider.expires_in = 8
    bridge = relay()
    send(bridge, 1)
    send(bridge, 2)
    assert len(provider.request_list()) == 1
    first = provider.issued[0]
    wait_until(first.issued_at + 7.45)  # past the refresh point (7.2 s), before expiry
    send(bridge, 3)
    send(bridge, 4)
    assert len(provider.request_list()) == 2
    refreshed_at = provider.answered[1][0]
    assert refreshed_at < first.expires_at  # refreshed before the old token expired
    second = provider.issued[1].token
    assert logins(provider) == [("XOAUTH2", USERNAME, token, True)
                                for token in (first.token, first.token, second, second)]
    assert arrived(provider) == [message(i) for i in range(1, 5)]


# 3. Concurrent transactions share one request.

def test_twenty_concurrent_messages_make_one_token_request(relay, provider):
    provider.delay = 1.5  # the endpoint is slow: every session needs the token meanwhile
    bridge = relay()
    count = 20
    assert send_together(bridge, range(count)) == [{}] * count
    assert len(provider.request_list()) == 1
    [token] = provider.issued_tokens()
    assert logins(provider) == [("XOAUTH2", USERNAME, token, True)] * count
    assert arrived(provider) == sorted(message(i) for i in range(count))
    # Most sessions were ready for AUTH before the endpoint answered: they waited for
    # the one request instead of making their own.
    answered_at = provider.answered[0][0]
    assert sum(1 for t in provider.tls_sessions if t < answered_at) >= count // 2


# 4. A rotated refresh token is saved and used.

def test_a_rotated_refresh_token_is_saved_and_used_next(relay, provider, tmp_path):
    provider.rotate, provider.expires_in = True, 1
    original = next(iter(provider.refresh_tokens))
    bridge = relay()
    path = tmp_path / "bridge-0" / "secrets" / "refresh-token"
    path.chmod(0o640)  # (a start refuses it so; the save makes it 0600 again)
    send(bridge, 1)
    [rotated] = provider.refresh_tokens  # the endpoint now takes only this one
    assert rotated != original
    assert path.read_text() == rotated + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == ["client-secret", "refresh-token"]
    wait_until(provider.issued[0].expires_at + 0.1)
    send(bridge, 2)
    [third] = provider.refresh_tokens
    assert [r["refresh_token"] for r in provider.request_list()] == [original, rotated]
    assert path.read_text() == third + "\n"
    assert [accepted for *_, accepted in logins(provider)] == [True, True]
    assert arrived(provider) == [message(1), message(2)]


# 5. and 6. The endpoint fails: 454 4.7.0, and the next message tries again.

def test_an_unreachable_endpoint_then_it_comes_back(relay, provider):
    bridge = relay()
    provider.stop_endpoint()
    code, text = refused_at_mail(bridge)
    assert code == 454
    assert text.startswith(f"4.7.0 OAuth2 token request to {provider.endpoint_host} failed: "
                           "unreachable: "), text
    assert "refused" in text.lower()
    assert provider.login_list() == []  # no AUTH without a token
    provider.start_endpoint()
    send(bridge, 1)
    assert len(provider.request_list()) == 1
    assert arrived(provider) == [message(1)]


def test_a_slow_endpoint_times_out_then_answers_again(relay, provider):
    provider.delay = 3.0
    bridge = relay(grant=lambda p, d: refresh_grant(p, d, timeout=1))
    assert refused_at_mail(bridge) == (
        454, f"4.7.0 OAuth2 token request to {provider.endpoint_host} failed: timed out")
    provider.delay = 0.0
    send(bridge, 1)
    assert len(provider.request_list()) == 2
    assert arrived(provider) == [message(1)]


def test_invalid_grant_is_reported_and_asked_again_next_time(relay, provider):
    bridge = relay()
    provider.refresh_tokens = set()  # the refresh token was revoked
    expected = (f"4.7.0 OAuth2 token request to {provider.endpoint_host} failed: "
                f"invalid_grant: {INVALID_GRANT['error_description']}")
    assert refused_at_mail(bridge) == (454, expected)
    assert refused_at_mail(bridge) == (454, expected)
    assert len(provider.request_list()) == 2  # a failure is not cached
    assert provider.login_list() == [] and provider.message_list() == []


# 7. The upstream refuses a token.

@pytest.mark.parametrize(("mechanism", "answer"), [("xoauth2", b""),
                                                    ("oauthbearer", b"\x01")])
def test_a_revoked_token_is_dropped_and_a_new_one_fetched(relay, provider, no_secret_logged,
                                                          mechanism, answer):
    bridge = relay(mechanism=mechanism, session_idle=0)  # each message logs in anew
    send(bridge, 1)
    provider.revoke()
    send(bridge, 2)
    first, second = provider.issued_tokens()
    used = mechanism.upper()
    assert logins(provider) == [(used, USERNAME, first, True), (used, USERNAME, first, False),
                                (used, USERNAME, second, True)]
    assert provider.login_list()[1].answer == answer  # the error challenge was answered
    assert len(provider.request_list()) == 2
    assert arrived(provider) == [message(1), message(2)]
    assert f"OAuth2 token for {USERNAME} refused ({REJECTED} (status 401" \
        in logged(no_secret_logged)


def test_sessions_refused_the_same_token_share_one_new_one(relay, provider):
    bridge = relay(session_idle=0)  # each message logs in anew
    send(bridge, 0)
    provider.revoke()
    # Every session offers the old token before the first refusal, and each is refused
    # while the one new request is under way.
    count = 10
    provider.reject_delays, provider.delay = [0.5] * count, 1.0
    assert send_together(bridge, range(1, count + 1)) == [{}] * count
    first, second = provider.issued_tokens()
    seen = logins(provider)
    assert seen[0] == ("XOAUTH2", USERNAME, first, True)
    refused, accepted = ("XOAUTH2", USERNAME, first, False), ("XOAUTH2", USERNAME, second, True)
    assert sorted(seen[1:], key=lambda login: login[3]) == [refused] * count + [accepted] * count
    assert len(provider.request_list()) == 2
    assert arrived(provider) == sorted(message(i) for i in range(count + 1))


def test_a_late_refusal_of_the_old_token_keeps_the_new_one(relay, provider):
    bridge = relay(session_idle=0)  # each message logs in anew
    send(bridge, 0)
    provider.revoke()
    # Both sessions offer the old token; one is refused soon and fetches the new one, the
    # other is refused only after the new one is there: it must use it, not drop it.
    provider.reject_delays, provider.delay = [0.2, 1.5], 0.5
    assert send_together(bridge, range(1, 3)) == [{}, {}]
    first, second = provider.issued_tokens()
    seen = logins(provider)
    assert seen[0] == ("XOAUTH2", USERNAME, first, True)
    assert sorted(seen[1:], key=lambda login: login[3]) == \
        [("XOAUTH2", USERNAME, first, False)] * 2 + [("XOAUTH2", USERNAME, second, True)] * 2
    late = max(login.at for login in provider.login_list() if not login.accepted)
    assert late > provider.answered[1][0]  # the new token was there before the late refusal
    assert len(provider.request_list()) == 2
    assert arrived(provider) == [message(0), message(1), message(2)]


@pytest.mark.parametrize(("expires_in", "kept"), [(3600, True), (60, False)])
def test_a_session_is_kept_only_while_its_token_is_good(relay, provider, expires_in, kept):
    provider.expires_in = expires_in
    bridge = relay()
    send(bridge, 1)
    send(bridge, 2)
    [token] = provider.issued_tokens()
    assert logins(provider) == [("XOAUTH2", USERNAME, token, True)] * (1 if kept else 2)
    assert arrived(provider) == [message(1), message(2)]


def test_an_upstream_refusing_every_token_gets_two_attempts(relay, provider):
    provider.reject_all = True
    bridge = relay()
    code, text = refused_at_mail(bridge)
    assert code == 454
    assert text == (f"4.7.0 Upstream localhost:{provider.upstream_port} rejected the login "
                    f"of {USERNAME}: {REJECTED} (status 401, schemes bearer, "
                    f"scope https://mail.google.com/)")
    first, second = provider.issued_tokens()
    assert logins(provider) == [("XOAUTH2", USERNAME, first, False),
                                ("XOAUTH2", USERNAME, second, False)]
    assert [login.answer for login in provider.login_list()] == [b"", b""]
    assert len(provider.request_list()) == 2
    assert provider.message_list() == []


# 8. Microsoft 365 application access.

def test_client_credentials_with_a_client_secret(relay, provider):
    bridge = relay(grant=client_credentials_grant)
    send(bridge, 1)
    assert provider.request_list() == [{"grant_type": "client_credentials",
                                        "client_id": CLIENT_ID,
                                        "client_secret": provider.client_secret,
                                        "scope": M365_SCOPE}]
    [token] = provider.issued_tokens()
    assert logins(provider) == [("XOAUTH2", USERNAME, token, True)]
    assert arrived(provider) == [message(1)]


# 9. smtpbridge check.

def check(provider: Provider, directory: Any, *, revoked: bool = False,
          ) -> subprocess.CompletedProcess:
    """C{smtpbridge check} with the account "scans"; C{revoked}: its refresh token was."""
    secrets_dir = str(directory / "secrets")
    write_secrets(provider, secrets_dir)
    if revoked:
        provider.refresh_tokens = set()
    path = directory / "check.toml"
    path.write_text("""
[server]
hostname = "bridge.test"

[[listener]]
name = "plain"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
auth = "optional"
""" + account_toml(provider, secrets_dir, "xoauth2", refresh_grant))
    result = subprocess.run([SMTPBRIDGE, "check", "--config", str(path)], capture_output=True,
                            text=True, timeout=60)
    REPLIES.extend((result.stdout, result.stderr))
    return result


def test_check_fetches_a_token_and_logs_in(provider, tmp_path):
    result = check(provider, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^ +ok +token +", result.stdout, re.MULTILINE), result.stdout
    assert re.search(rf"^ +ok +AUTH +XOAUTH2 accepted for {re.escape(USERNAME)}$",
                     result.stdout, re.MULTILINE), result.stdout
    [token] = provider.issued_tokens()
    assert logins(provider) == [("XOAUTH2", USERNAME, token, True)]
    assert len(provider.request_list()) == 1  # the token step's token is the one used


def test_check_reports_invalid_grant(provider, tmp_path):
    result = check(provider, tmp_path, revoked=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^ +FAIL +454 4\.7\.0 .*invalid_grant: Token has been expired or "
                     r"revoked\.$", result.stdout, re.MULTILINE), result.stdout
    assert provider.login_list() == []


# 9b. Round two: what a real Microsoft 365 or Gmail setup needs on the first try.

def microsoft_delegated_grant(provider: Provider, directory: str, extra: str = "") -> str:
    """[account.scans.oauth] as etc/m365.toml's delegated example: a public client (no
    secret), the scope left to the provider's default; the endpoint is the local one."""
    return f"""grant = "refresh_token"
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
token_url = "{provider.token_url}"
client_id = "{CLIENT_ID}"
refresh_token_file = "{directory}/refresh-token"
ca_certificates = "{provider.endpoint_ca}"
timeout = 10
{extra}"""


def test_microsoft_delegated_public_client(relay, provider, tmp_path):
    """Item 1: a public client sends no secret and the delegated SMTP scope; Microsoft
    rotates the refresh token each time, and the bridge keeps the file current."""
    provider.client_secret, provider.rotate = None, True
    original = next(iter(provider.refresh_tokens))
    bridge = relay(grant=microsoft_delegated_grant)
    send(bridge, 1)
    assert provider.request_list() == [{"grant_type": "refresh_token",
                                        "refresh_token": original, "client_id": CLIENT_ID,
                                        "scope": M365_DELEGATED_SCOPE}]
    [rotated] = provider.refresh_tokens
    path = tmp_path / "bridge-0" / "secrets" / "refresh-token"
    assert path.read_text() == rotated + "\n"
    [token] = provider.issued_tokens()
    assert logins(provider) == [("XOAUTH2", USERNAME, token, True)]
    assert arrived(provider) == [message(1)]


def test_a_configured_refresh_margin_is_used(relay, provider):
    """Item 3: refresh_margin = 0.4 renews a 12 s token 0.4 s before it expires (the 300 s
    default is capped at a tenth of the life: 1.2 s)."""
    provider.expires_in = 12
    bridge = relay(grant=lambda p, d: refresh_grant(p, d) + "refresh_margin = 0.4\n")
    send(bridge, 1)
    first = provider.issued[0]
    wait_until(first.issued_at + 11.0)
    send(bridge, 2)
    assert len(provider.request_list()) == 1  # reused past the default's refresh point
    wait_until(first.issued_at + 11.7)
    send(bridge, 3)
    assert len(provider.request_list()) == 2
    second = provider.issued[1].token
    assert logins(provider) == [("XOAUTH2", USERNAME, token, True)
                                for token in (first.token, first.token, second)]


def assertion_grant(certificate: tuple[str, str]) -> Callable[[Provider, str], str]:
    def grant(provider: Provider, directory: str) -> str:
        return microsoft_delegated_grant(provider, directory, f"""client_certificate = \
"{certificate[0]}"
client_key = "{certificate[1]}"
""".replace("\\\n", ""))
    return grant


def test_a_refresh_token_with_a_client_assertion(relay, provider, tmp_path):
    """Item 4: a confidential client with a certificate signs an assertion for the
    refresh token grant too; without it the endpoint says AADSTS7000218."""
    client = (str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    create_self_signed(*client, "smtpbridge-client")
    provider.client_secret, provider.assertion_certificate = None, client[0]
    bridge = relay(grant=assertion_grant(client))
    send(bridge, 1)
    [form] = provider.request_list()
    assert set(form) == {"grant_type", "refresh_token", "client_id", "scope",
                         "client_assertion_type", "client_assertion"}
    assert form["grant_type"] == "refresh_token"
    assert arrived(provider) == [message(1)]
    public = relay(grant=microsoft_delegated_grant)  # the certificate left out
    assert refused_at_mail(public) == (
        454, f"4.7.0 OAuth2 token request to {provider.endpoint_host} failed: "
             f"invalid_client: {NO_CREDENTIAL['error_description']}")


def test_the_keepalive_keeps_an_idle_refresh_token_alive(reactor, relay, provider, tmp_path,
                                                         no_secret_logged):
    """Item 5: the endpoint forgets refresh tokens unused for 3 s (Microsoft: 90 days).
    While the keepalive refreshes an idle account (every second here), a message after
    4 s of silence goes through; once it stops, the next silence kills the token."""
    provider.rotate, provider.refresh_idle_limit = True, 3.0
    provider.refresh_used[next(iter(provider.refresh_tokens))] = time.time()
    bridge = relay(session_idle=0)  # each message logs in anew
    path = tmp_path / "bridge-0" / "smtpbridge.toml"
    config = parse_config(path.read_text(), str(path))
    settings = {"scans": attr.evolve(config.accounts["scans"].oauth, keepalive_interval=1.0)}
    keepalive = token_keepalive(settings, token_sources(config, reactor), reactor)
    blockingCallFromThread(reactor, keepalive.startService)
    try:
        time.sleep(4.2)
    finally:
        blockingCallFromThread(reactor, keepalive.stopService)
    assert len(provider.request_list()) >= 3
    send(bridge, 1)
    assert arrived(provider) == [message(1)]
    text = logged(no_secret_logged)
    assert "OAuth2 keepalive: account scans fetched no token for 1 s; refreshing" in text
    assert "OAuth2 keepalive: account scans refreshed" in text
    time.sleep(3.3)
    provider.revoke()  # the access token goes too: the bridge must use the refresh token
    assert refused_at_mail(bridge)[1].endswith(INVALID_GRANT["error_description"])


def test_oauthbearer_escapes_the_user_name(reactor, certificate, users_file, tmp_path):
    """Item 6: "," and "=" in the OAUTHBEARER a= name are sent as =2C and =3D (RFC 7628);
    the upstream decodes them back to the account's name."""
    odd = "scan,ner=1@example.com"
    provider = start_provider(reactor, certificate, str(tmp_path / "provider"), username=odd)
    secrets_dir = str(tmp_path / "secrets")
    write_secrets(provider, secrets_dir)
    toml = front_toml(certificate, users_file) + account_toml(
        provider, secrets_dir, "oauthbearer", refresh_grant).replace(USERNAME, odd)
    bridge = start_bridge(reactor, toml, str(tmp_path))
    try:
        send(bridge, 1)
    finally:
        stop_bridge(reactor, bridge)
        provider.stop()
    [token] = provider.issued_tokens()
    assert [(login.mechanism, login.user, login.token, login.accepted)
            for login in provider.login_list()] == [("OAUTHBEARER", odd, token, True)]


# 10. The scan itself.

def test_the_scan_would_see_a_leak(no_secret_logged, provider):
    """The log scan is not blind: a secret in a log event is found."""
    from twisted.logger import Logger

    Logger().info("leaked {value}", value=base64.b64encode(
        provider.client_secret.encode()).decode())
    texts = [formatEvent(event) for event in list(no_secret_logged)]
    assert any(s in t for s in secrets_now() for t in texts)
    del no_secret_logged[:]  # the planted leak is not the bridge's
