"""Upstream TLS policy: implicit TLS, a raised minimum version, key pins, SNI."""

from __future__ import annotations

import ssl

import pytest
from OpenSSL import crypto
from twisted.internet.threads import blockingCallFromThread

from smtpbridge import connector
from smtpbridge.config import parse_config
from smtpbridge.errors import SMTPReplyError
from smtpbridge.service import accounts
from smtpbridge.tls import public_key_pin
from tests.upstream import Upstream, upstream, upstream_factory

FIXTURES = (upstream, upstream_factory)


def pin_of(tmp_path, name: str = "upstream") -> str:
    with open(tmp_path / name / "localhost.crt", "rb") as f:
        return public_key_pin(crypto.load_certificate(crypto.FILETYPE_PEM, f.read()))


def session_with(reactor, up: Upstream, **route_changes: object) -> object:
    """Open (and close) an upstream session; the error if it fails."""
    async def attempt() -> object:
        try:
            session = await connector.connect(reactor, up.route(**route_changes), up.account(),
                                              "bridge.test")
        except SMTPReplyError as e:
            return e
        await session.quit()
        return session

    from twisted.internet.defer import Deferred

    return blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(attempt()))


def test_implicit_tls_upstream(reactor, upstream_factory):
    up = upstream_factory(implicit_tls=True)
    result = session_with(reactor, up)
    assert not isinstance(result, SMTPReplyError), result
    assert up.clear_text() == b""  # nothing at all before TLS
    assert up.logins == [("PLAIN", up.username, True)]


def test_minimum_tls_version_can_be_raised(reactor, upstream_factory):
    up = upstream_factory(max_tls_version=ssl.TLSVersion.TLSv1_2)
    assert not isinstance(session_with(reactor, up), SMTPReplyError)
    refused = session_with(reactor, up, min_tls_version="1.3")
    assert isinstance(refused, SMTPReplyError)
    assert (refused.reply.code, refused.reply.enhanced) == (454, "4.7.5")
    assert "TLS failed" in refused.reply.text
    assert len(up.logins) == 1  # only the first session logged in


def test_a_pinned_key_is_required(reactor, upstream, tmp_path):
    pin = pin_of(tmp_path)
    result = session_with(reactor, upstream, pins=(pin,))
    assert not isinstance(result, SMTPReplyError), result
    other = "A" * 43 + "="
    refused = session_with(reactor, upstream, pins=(other,))
    assert isinstance(refused, SMTPReplyError)
    assert refused.reply.code == 454 and refused.reply.enhanced == "4.7.5"
    assert refused.reply.text == (f"Upstream localhost:{upstream.port} TLS failed: the "
                                  f"certificate's public key sha256/{pin} is not the pinned one")
    assert upstream.logins == [("PLAIN", upstream.username, True)]  # none after the mismatch


def test_sni_is_sent_for_dns_names_only(reactor, upstream_factory):
    up = upstream_factory(certificate_names=["localhost", "127.0.0.1"])
    session_with(reactor, up)
    session_with(reactor, up, host="127.0.0.1")
    assert up.sni == ["localhost", None]


def test_the_config_carries_the_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("PW", "x")
    pin = "sha256/" + "B" * 43 + "="
    config = parse_config(f"""
[[listener]]
name = "plain"
endpoint = "tcp:2525"
tls = "none"
auth = "optional"

[upstream]
host = "smtp.example.com"
port = 465
tls = "implicit"
min_tls_version = "1.3"
pin_sha256 = ["{pin}"]

[credentials]
username = "u"
password_env = "PW"
""", str(tmp_path / "c.toml"))
    [route] = accounts(config)["default"].routes
    assert (route.port, route.tls, route.min_tls_version) == (465, "implicit", "1.3")
    assert route.pins == ("B" * 43 + "=",)


@pytest.mark.parametrize("pin", ["not-base64!", "QUJD"])
def test_a_bad_pin_is_a_config_error(tmp_path, monkeypatch, pin):
    from smtpbridge.errors import ConfigError

    monkeypatch.setenv("PW", "x")
    with pytest.raises(ConfigError) as info:
        parse_config(f"""
[[listener]]
name = "plain"
endpoint = "tcp:2525"
tls = "none"
auth = "optional"
[upstream]
host = "smtp.example.com"
pin_sha256 = ["{pin}"]
[credentials]
username = "u"
password_env = "PW"
""", str(tmp_path / "c.toml"))
    assert "upstream.pin_sha256: " in str(info.value) and "SHA-256 pin" in str(info.value)
