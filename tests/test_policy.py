"""Tests for smtpbridge.policy: trusted networks and the submission decision."""

from __future__ import annotations

import ipaddress

import pytest
from zope.interface.verify import verifyObject

from smtpbridge.interfaces import IAccessPolicy
from smtpbridge.model import ClientInfo
from smtpbridge.networks import NetworkSet
from smtpbridge.policy import REPLY_AUTH_REQUIRED, AccessPolicy

NETWORKS = ["127.0.0.0/8", "192.168.1.7/24", "10.0.0.5", "::1/128", "2001:db8::/32", "fe80::/10"]


@pytest.fixture
def trusted() -> NetworkSet:
    return NetworkSet.parse(NETWORKS)


def test_parse(trusted: NetworkSet) -> None:
    assert trusted.networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("192.168.1.0/24"),
        ipaddress.ip_network("10.0.0.5/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("fe80::/10"),
    )


@pytest.mark.parametrize("value", ["10.0.0.0/33", "localhost", "", "1.2.3", "::g", 10, None])
def test_parse_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        NetworkSet.parse(["127.0.0.0/8", value])
    assert str(info.value) == f"{value!r} is not an IP network"


@pytest.mark.parametrize("value", ["10.0.0.0/33", "localhost", 10])
def test_the_config_names_a_bad_trusted_network(value: object) -> None:
    from smtpbridge.config import parse_config
    from smtpbridge.errors import ConfigError

    text = f"""
[access]
trusted_networks = ["127.0.0.0/8", {value!r}]
[[listener]]
name = "a"
endpoint = "tcp:0"
tls = "none"
auth = "optional"
[upstream]
host = "smtp.example.com"
[credentials]
username = "u"
password_env = "HOME"
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text.replace("'", '"'), "f.toml")
    error = info.value
    assert (error.file, error.key) == ("f.toml", "access.trusted_networks")
    assert error.reason == f"{value!r} is not an IP network"


def test_parse_empty() -> None:
    assert "127.0.0.1" not in NetworkSet.parse([])


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.255.255.254",
        "192.168.1.200",
        "10.0.0.5",
        "::1",
        "2001:db8:1::25",
        "::ffff:127.0.0.1",
        "::ffff:192.168.1.9",
        "::FFFF:10.0.0.5",
        "fe80::1%eth0",
        "fe80::1%2",
        "[::1]",
    ],
)
def test_contains(trusted: NetworkSet, host: str) -> None:
    assert host in trusted


@pytest.mark.parametrize(
    "host",
    [
        "192.168.2.1",
        "10.0.0.6",
        "8.8.8.8",
        "::2",
        "2001:db9::1",
        "::ffff:8.8.8.8",
        "::ffff:10.0.0.6",
        "::127.0.0.1",
        "64:ff9b::127.0.0.1",
        "fec0::1%eth0",
        "/run/smtpbridge.sock",
        "",
        "%eth0",
        "localhost",
        "127.0.0.1:25",
        None,
        2130706433,
        b"127.0.0.1",
        ipaddress.ip_address("127.0.0.1"),
    ],
)
def test_not_contains(trusted: NetworkSet, host: object) -> None:
    assert host not in trusted


def test_ipv6_networks_do_not_match_ipv4_peers() -> None:
    networks = NetworkSet([ipaddress.ip_network("::/0")])
    assert "::1" in networks
    assert "192.0.2.1" not in networks


def test_mapped_peer_matches_mapped_network() -> None:
    networks = NetworkSet([ipaddress.ip_network("::ffff:0:0/96")])
    assert "::ffff:192.0.2.1" in networks


def client(host: str = "192.0.2.1", login: str | None = None) -> ClientInfo:
    return ClientInfo(
        peer_host=host, peer_port=40000, listener="legacy", session_id="s1", login=login
    )


@pytest.fixture
def policy(trusted: NetworkSet) -> AccessPolicy:
    return AccessPolicy(trusted)


def test_policy_provides_interface(policy: AccessPolicy) -> None:
    assert verifyObject(IAccessPolicy, policy)


def test_reply() -> None:
    assert (REPLY_AUTH_REQUIRED.code, REPLY_AUTH_REQUIRED.enhanced) == (530, "5.7.0")
    assert REPLY_AUTH_REQUIRED.text == "Authentication required"


@pytest.mark.parametrize("auth_required", [True, False])
@pytest.mark.parametrize("host", ["192.0.2.1", "127.0.0.1"])
def test_authenticated_may_submit(policy: AccessPolicy, auth_required: bool, host: str) -> None:
    assert policy.may_submit(client(host, login="alice"), auth_required) is None


def test_trusted_without_auth_when_optional(policy: AccessPolicy) -> None:
    assert policy.may_submit(client("127.0.0.1"), auth_required=False) is None
    assert policy.may_submit(client("::ffff:192.168.1.3"), auth_required=False) is None


def test_trusted_without_auth_when_required(policy: AccessPolicy) -> None:
    assert policy.may_submit(client("127.0.0.1"), auth_required=True) is REPLY_AUTH_REQUIRED


@pytest.mark.parametrize("auth_required", [True, False])
def test_untrusted_without_auth(policy: AccessPolicy, auth_required: bool) -> None:
    assert policy.may_submit(client("192.0.2.1"), auth_required) is REPLY_AUTH_REQUIRED


def test_empty_login_is_not_authenticated(policy: AccessPolicy) -> None:
    assert policy.may_submit(client("192.0.2.1", login=""), True) is REPLY_AUTH_REQUIRED


def test_unix_socket_peer(policy: AccessPolicy) -> None:
    assert policy.may_submit(client("/run/smtpbridge.sock"), False) is REPLY_AUTH_REQUIRED
