"""OAuth2 round two, below the wire: the settings checked at config load, the shipped
examples, the OAUTHBEARER user name, the refresh margin and the keepalive with a Clock."""

from __future__ import annotations

import os
import pwd
import re
import time
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from smtpbridge import sasl
from smtpbridge.config import parse_config
from smtpbridge.errors import ConfigError, TokenError
from smtpbridge.oauth import CachedTokenSource, Token, TokenKeepalive, token_keepalive
from smtpbridge.oauthconfig import (
    DEFAULT_KEEPALIVE,
    GRANT_KEYS,
    OAuthSettings,
    describe,
    environment_proxy,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELEGATED = "https://outlook.office.com/SMTP.Send offline_access"
ACCOUNT = """
[[listener]]
name = "plain"
endpoint = "tcp:2525"
tls = "none"
auth = "optional"

[upstream]
host = "smtp.office365.com"

[account.scanner]
username = "scanner@contoso.com"
mechanism = "xoauth2"

[account.scanner.oauth]
{oauth}
[credentials]
account = "scanner"
"""


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SMTPBRIDGE_TEST_SECRET", "not-a-real-secret")


@pytest.fixture
def token_dir(tmp_path: Any) -> Any:
    """A state directory holding a refresh token file."""
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "refresh-token").write_text("not-a-real-token\n")
    return directory


def microsoft(token_dir: Any, extra: str = "") -> str:
    """A delegated Microsoft account's oauth table (public client), plus C{extra}."""
    return (f'grant = "refresh_token"\nprovider = "microsoft"\n'
            f'tenant = "contoso.onmicrosoft.com"\nclient_id = "app-1"\n'
            f'refresh_token_file = "{token_dir}/refresh-token"\n{extra}')


def settings_of(oauth: str, path: str = "/etc/smtpbridge/test.toml") -> OAuthSettings:
    settings = parse_config(ACCOUNT.format(oauth=oauth), path).accounts["scanner"].oauth
    assert settings is not None
    return settings


def error_of(oauth: str, path: str = "/etc/smtpbridge/test.toml") -> str:
    """The one-line error for the oauth table, checked to name the file."""
    with pytest.raises(ConfigError) as info:
        settings_of(oauth, path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: account.scanner.oauth.")
    return message


# --- item 1: the delegated Microsoft path ----------------------------------------------

def test_a_microsoft_refresh_token_gets_the_delegated_scope(token_dir):
    settings = settings_of(microsoft(token_dir))
    assert settings.scope == DELEGATED
    assert settings.client_secret is None and settings.client_certificate is None
    assert settings.token_url == ("https://login.microsoftonline.com/contoso.onmicrosoft.com"
                                  "/oauth2/v2.0/token")
    assert describe(settings)[0] == ("grant", "refresh_token as a public client (no client "
                                              "secret)")
    given = settings_of(microsoft(token_dir, 'scope = "https://outlook.office.com/SMTP.Send"'))
    assert given.scope == "https://outlook.office.com/SMTP.Send"
    google = settings_of(microsoft(token_dir).replace('provider = "microsoft"\ntenant = '
                                                      '"contoso.onmicrosoft.com"',
                                                      'provider = "google"'))
    assert google.scope is None  # Google's refresh needs none


def uncommented_delegated_example(tmp_path: Any) -> str:
    """etc/m365.toml with its commented delegated table in place of the active one, the
    paths moved to C{tmp_path}."""
    with open(os.path.join(ROOT, "etc", "m365.toml"), encoding="utf-8") as f:
        text = f.read()
    active = re.search(r"^\[account\.scanner\.oauth\]\n(?:[^\n\[#][^\n]*\n)+", text, re.M)
    commented = re.search(r"^# \[account\.scanner\.oauth\]\n(?:# [^\n]*\n?)+", text, re.M)
    assert active is not None and commented is not None
    table = "\n".join(line[2:] for line in commented.group(0).splitlines()) + "\n"
    text = text[:active.start()] + table + text[active.end():commented.start()]
    return text.replace("/var/lib/smtpbridge/", f"{tmp_path}/")


def test_the_m365_delegated_example_parses(tmp_path):
    (tmp_path / "m365-refresh-token").write_text("not-a-real-token\n")
    config = parse_config(uncommented_delegated_example(tmp_path), str(tmp_path / "m.toml"))
    oauth = config.accounts["scanner"].oauth
    assert oauth is not None
    assert (oauth.grant, oauth.scope, oauth.client_secret) == ("refresh_token", DELEGATED,
                                                               None)
    assert oauth.token_url.startswith("https://login.microsoftonline.com/contoso.")
    assert oauth.refresh_token_file == str(tmp_path / "m365-refresh-token")
    with open(os.path.join(ROOT, "etc", "m365.toml"), encoding="utf-8") as f:
        text = f.read()
    for words in ("Allow public client flows", "SMTP.Send", "AS THE MAILBOX", "--owner",
                  "AADSTS50194", "AADSTS7000218", "5.7.139", "535 5.7.3", "invalid_grant"):
        assert words in text


def test_every_oauth_key_is_documented():
    with open(os.path.join(ROOT, "etc", "smtpbridge.toml"), encoding="utf-8") as f:
        text = f.read()
    documented = set(re.findall(r"^# ([a-z_]+) = ", text[text.index("[account.scanner.oauth]"):],
                                re.M))
    keys = set(GRANT_KEYS) - {"client_secret_env"} | {"grant", "provider", "tenant",
                                                      "token_url"}
    assert keys <= documented, keys - documented
    assert "Default 300." in text and "Default 604800" in text


# --- item 2: the refresh token file and its directory -----------------------------------

def test_the_refresh_token_file_must_exist_in_an_existing_directory(tmp_path):
    missing_directory = error_of(microsoft(tmp_path / "nowhere"))
    assert f"refresh_token_file: the directory {tmp_path}/nowhere does not exist: create " \
           "it, owned by " in missing_directory
    (tmp_path / "state").mkdir()
    missing_file = error_of(microsoft(tmp_path / "state"))
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert missing_file.endswith(f"refresh_token_file: {tmp_path}/state/refresh-token does "
                                 f"not exist: run smtpbridge oauth-login as {user} (or with "
                                 f"--owner {user})")


def test_a_refresh_token_file_for_another_grant_is_refused(token_dir):
    text = microsoft(token_dir).replace('grant = "refresh_token"', 'grant = "token_file"\n'
                                        'token_file = "/run/token"')
    assert error_of(text).endswith("refresh_token_file: not used with grant = 'token_file'")


# --- item 3: the refresh margin ---------------------------------------------------------

def test_refresh_margin_defaults_to_300_and_is_configurable(token_dir):
    assert settings_of(microsoft(token_dir)).refresh_margin == 300.0
    assert settings_of(microsoft(token_dir, "refresh_margin = 600")).refresh_margin == 600.0
    assert "must be at least 0" in error_of(microsoft(token_dir, "refresh_margin = -1"))


class Fetches:
    """A fetch counting its calls: token-N living C{lifetime} seconds, or a failure."""

    def __init__(self, clock: Clock, lifetime: float = 3600.0) -> None:
        self.clock, self.lifetime, self.calls = clock, lifetime, 0
        self.failing = False

    def __call__(self) -> Deferred[Token]:
        self.calls += 1
        if self.failing:
            return fail(TokenError("OAuth2 token request to x failed: invalid_grant"))
        return succeed(Token(f"token-{self.calls}", self.clock.seconds() + self.lifetime))


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_a_token_is_renewed_300_seconds_before_it_expires_by_default():
    clock = Clock()
    fetch = Fetches(clock)
    source = CachedTokenSource(fetch, clock)
    assert result_of(source.token()) == "token-1"
    clock.advance(3299.9)
    assert result_of(source.token()) == "token-1"
    clock.advance(0.1)
    assert result_of(source.token()) == "token-2"
    assert source.fetched_at == 3300.0
    assert result_of(source.refresh()) == "token-3"  # whatever the cache holds


# --- item 4: a certificate with the refresh_token grant ---------------------------------

def test_a_certificate_with_a_refresh_token_is_used_not_ignored(token_dir):
    settings = settings_of(microsoft(token_dir, 'client_certificate = "c.pem"\n'
                                                'client_key = "c.key"\n'))
    assert settings.client_certificate == "/etc/smtpbridge/c.pem"
    assert describe(settings)[0] == ("grant", "refresh_token with a client assertion "
                                              "(certificate /etc/smtpbridge/c.pem)")


@pytest.mark.parametrize(("extra", "key", "reason"), [
    ('client_certificate = "c.pem"\n', "client_key", "required with client_certificate"),
    ('client_key = "c.key"\n', "client_certificate", "required with client_key"),
    ('client_certificate = "c.pem"\nclient_key = "c.key"\n'
     'client_secret_env = "SMTPBRIDGE_TEST_SECRET"\n', "client_secret", "not both"),
    ('client_key = "c.key"\nclient_secret_env = "SMTPBRIDGE_TEST_SECRET"\n',
     "client_secret", "not both"),
])
def test_client_authentication_mistakes(token_dir, extra, key, reason):
    message = error_of(microsoft(token_dir, extra))
    assert f"account.scanner.oauth.{key}: " in message and reason in message, message
    text = re.sub(r"refresh_token_file = .*\n", 'scope = "s"\n', microsoft(token_dir, extra))
    message = error_of(text.replace('grant = "refresh_token"', 'grant = "client_credentials"'))
    if "client_certificate" in extra or "client_secret" in extra:  # else: neither is given
        assert f"account.scanner.oauth.{key}: " in message and reason in message, message
    else:
        assert "account.scanner.oauth.client_secret: " in message and "not both" in message


# --- item 5: the proxy and the keepalive ------------------------------------------------

def test_the_proxy_key(token_dir):
    settings = settings_of(microsoft(token_dir, 'proxy = "http://proxy.example:3128"'))
    assert (settings.proxy, settings.proxy_source) == ("http://proxy.example:3128", "proxy")
    assert describe(settings)[-1] == ("proxy", "token endpoint through proxy.example:3128 "
                                               "(from the config)")
    for url, reason in [("https://proxy.example:3128", "must be http://HOST:PORT"),
                        ("http://proxy.example", "give the port"),
                        ("proxy.example:3128", "must be http://HOST:PORT"),
                        ("http://proxy.example:99999", "not a number from 1 to 65535"),
                        ("http://u:pw-1@proxy.example:3128",
                         "credentials are not written in the config")]:
        message = error_of(microsoft(token_dir, f'proxy = "{url}"'))
        assert "account.scanner.oauth.proxy: " in message and reason in message
        assert "pw-1" not in message


def test_https_proxy_and_no_proxy_from_the_environment(token_dir, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://alice:pw-2@proxy.example:8080")
    settings = settings_of(microsoft(token_dir))
    assert (settings.proxy, settings.proxy_source) == ("http://alice:pw-2@proxy.example:8080",
                                                       "HTTPS_PROXY")
    assert "pw-2" not in repr(settings) and "pw-2" not in str(describe(settings))
    assert settings_of(microsoft(token_dir, 'proxy = ""')).proxy is None  # "" goes direct
    monkeypatch.setenv("NO_PROXY", "localhost,.microsoftonline.com")
    assert settings_of(microsoft(token_dir)).proxy is None
    assert environment_proxy("https://localhost:8443/token") == (None, "")
    assert environment_proxy("https://oauth2.googleapis.com/token")[1] == "HTTPS_PROXY"
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("https_proxy", "https://bob:pw-3@proxy.example")
    message = error_of(microsoft(token_dir))
    assert "proxy: https_proxy from the environment: must be http://HOST:PORT" in message
    assert "pw-3" not in message


def test_keepalive_interval(token_dir):
    assert settings_of(microsoft(token_dir)).keepalive_interval == DEFAULT_KEEPALIVE == 604800
    assert settings_of(microsoft(token_dir, "keepalive_interval = 0")).keepalive_interval == 0
    assert "must be 0 (off) or at least 3600 seconds" in error_of(
        microsoft(token_dir, "keepalive_interval = 7"))
    text = 'grant = "client_credentials"\ntoken_url = "https://t.example/token"\n' \
           'client_id = "x"\nscope = "s"\nclient_secret_env = "SMTPBRIDGE_TEST_SECRET"\n' \
           'keepalive_interval = 86400\n'
    assert error_of(text).endswith("keepalive_interval: not used with grant = "
                                   "'client_credentials'")


@pytest.mark.parametrize("url", ["https://[::1/token", "https://t.example:port/token",
                                 "http://t.example/token", "https://"])
def test_a_token_url_that_is_none_is_a_clear_error(url):
    text = f'grant = "client_credentials"\ntoken_url = "{url}"\n' \
           'client_id = "x"\nscope = "s"\nclient_secret_env = "SMTPBRIDGE_TEST_SECRET"\n'
    assert error_of(text).endswith("token_url: must be an https:// URL")


def keepalive(clock: Clock, fetch: Fetches, path: str, interval: float = 86400.0,
              ) -> tuple[TokenKeepalive, CachedTokenSource]:
    source = CachedTokenSource(fetch, clock)
    settings = {"scanner": OAuthSettings("refresh_token", "https://t.example/token", "app-1",
                                         refresh_token_file=path,
                                         keepalive_interval=interval),
                "app": OAuthSettings("client_credentials", "https://t.example/token", "app-2",
                                     scope="s")}
    service = token_keepalive(settings, {"scanner": source, "app": CachedTokenSource(
        Fetches(clock), clock)}, clock)
    assert list(service._accounts) == ["scanner"]  # only refresh tokens are kept alive
    return service, source


def test_the_keepalive_refreshes_an_idle_account_and_logs_it(tmp_path, logged):
    clock, path = Clock(), tmp_path / "refresh-token"
    path.write_text("x\n")
    day = 86400.0
    os.utime(path, (time.time() - day / 2, time.time() - day / 2))  # rotated 12 h ago
    fetch = Fetches(clock, lifetime=10 * day)
    service, source = keepalive(clock, fetch, str(path))
    service.startService()
    clock.advance(day / 2 - 10)
    assert fetch.calls == 0
    clock.advance(20)
    assert fetch.calls == 1  # a day after the file last changed
    clock.advance(day / 2)
    source.invalidate("token-1")  # a message whose token the upstream refused
    assert result_of(source.token()) == "token-2"
    clock.advance(day / 2)
    assert fetch.calls == 2  # a day after the keepalive's fetch, but not after the last
    clock.advance(day / 2 - 10)
    assert fetch.calls == 2
    clock.advance(20)
    assert fetch.calls == 3  # a day after the last fetch
    service.stopService()
    assert "OAuth2 keepalive: account scanner fetched no token for 1 day; refreshing" \
        in logged
    assert "OAuth2 keepalive: account scanner refreshed" in logged


def test_a_failed_keepalive_is_logged_and_tried_again_an_hour_later(tmp_path, logged):
    clock = Clock()
    fetch = Fetches(clock)
    fetch.failing = True
    service, _ = keepalive(clock, fetch, str(tmp_path / "gone"))  # no file: a day from now
    service.startService()
    clock.advance(86400)
    assert fetch.calls == 1
    clock.advance(3599)
    assert fetch.calls == 1
    clock.advance(1)
    assert fetch.calls == 2
    service.stopService()
    assert clock.getDelayedCalls() == []
    assert "OAuth2 keepalive: account scanner not refreshed (OAuth2 token request to x " \
           "failed: invalid_grant); trying again in 3600 s" in logged


# --- item 6: OAUTHBEARER's user name -----------------------------------------------------

def test_oauthbearer_escapes_comma_and_equals():
    assert sasl.gs2_name("a,b=c@example.com") == "a=2Cb=3Dc@example.com"
    assert sasl.gs2_name("plain@example.com") == "plain@example.com"
    response = sasl.oauthbearer_response("a,b=c", "tok", "smtp.example", 587)
    assert sasl.decode_response(response) == (b"n,a=a=2Cb=3Dc,\x01host=smtp.example\x01"
                                              b"port=587\x01auth=Bearer tok\x01\x01")


@pytest.mark.parametrize("key", ["refresh_token_file", "token_file", "client_key"])
def test_the_oauth_secret_files_others_can_read_are_refused(tmp_path: Any, key: str) -> None:
    (tmp_path / "refresh-token").write_text("x\n")
    (tmp_path / "refresh-token").chmod(0o600)
    secret = tmp_path / "secret"
    secret.write_text("x\n")
    secret.chmod(0o644)
    oauth = {
        "refresh_token_file": microsoft(tmp_path).replace(
            f"{tmp_path}/refresh-token", str(secret)),
        "token_file": f'grant = "token_file"\ntoken_file = "{secret}"\n',
        "client_key": microsoft(tmp_path, f'client_certificate = "{tmp_path}/cert.pem"\n'
                                          f'client_key = "{secret}"\n'),
    }[key]
    path = str(tmp_path / "c.toml")
    with pytest.raises(ConfigError) as error:
        parse_config(ACCOUNT.format(oauth=oauth), path)
    assert (error.value.key, error.value.file) == (f"account.scanner.oauth.{key}", path)
    assert "can be read by its group and others (mode 0644)" in str(error.value)
    secret.chmod(0o600)
    assert parse_config(ACCOUNT.format(oauth=oauth), path).warnings == ()
