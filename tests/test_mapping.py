"""The built-in credential mappers and how the configuration builds them."""

from __future__ import annotations

import os

import pytest
from zope.interface.verify import verifyObject

from smtpbridge.config import parse_config
from smtpbridge.errors import ConfigError, SMTPReplyError
from smtpbridge.interfaces import ICredentialMapper
from smtpbridge.mapping import (
    PassthroughMapper,
    PerDeviceMapper,
    PerSenderMapper,
    PerUserMapper,
    StaticMapper,
)
from smtpbridge.model import Assignment, ClientInfo, Route, UpstreamAccount
from smtpbridge.networks import parse_network
from smtpbridge.secret import Secret
from smtpbridge.service import accounts, upstreams

ROUTE = (Route("smtp.example.com"),)


def account(name: str) -> Assignment:
    return Assignment(ROUTE, UpstreamAccount(f"{name}@example.com", Secret("pw"), name=name))


SCANNER, OFFICE, CAMERA, DEFAULT = (account(n) for n in ("scanner", "office", "camera",
                                                         "default"))


def client(**values: object) -> ClientInfo:
    base = {"peer_host": "192.0.2.10", "peer_port": 1234, "listener": "smtps",
            "session_id": "s1"}
    base.update(values)
    return ClientInfo(**base)


def refused(mapper: object, c: ClientInfo, sender: str = "a@example.com") -> str:
    with pytest.raises(SMTPReplyError) as info:
        mapper.map(c, sender)
    reply = info.value.reply
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert "pw" not in reply.text
    return reply.text


def test_every_mapper_provides_the_interface():
    for mapper in (StaticMapper(SCANNER), PerUserMapper({}, None), PerSenderMapper({}, None),
                   PerDeviceMapper({}, [], {}, None), PassthroughMapper(ROUTE)):
        assert verifyObject(ICredentialMapper, mapper)


def test_static():
    assert StaticMapper(SCANNER).map(client(), "x@y.z") is SCANNER


def test_per_user():
    mapper = PerUserMapper({"scanner": SCANNER, "office": OFFICE}, DEFAULT)
    assert mapper.map(client(login="scanner"), "x@y.z") is SCANNER
    assert mapper.map(client(login="office"), "x@y.z") is OFFICE
    assert mapper.map(client(login="someone"), "x@y.z") is DEFAULT
    assert mapper.map(client(), "x@y.z") is DEFAULT
    strict = PerUserMapper({"scanner": SCANNER}, None)
    assert "clients without AUTH" in refused(strict, client())
    assert "user someone" in refused(strict, client(login="someone"))


def test_per_sender_exact_then_domain_then_default():
    mapper = PerSenderMapper({"scan@example.com": SCANNER, "@example.com": OFFICE}, DEFAULT)
    assert mapper.map(client(), "Scan@Example.COM") is SCANNER
    assert mapper.map(client(), "anyone@example.com") is OFFICE
    assert mapper.map(client(), "anyone@sub.example.com") is DEFAULT
    assert mapper.map(client(), "") is DEFAULT
    assert "sender <x@other.example>" in refused(PerSenderMapper({}, None), client(),
                                                 "x@other.example")


def test_per_device_certificate_then_network_then_listener():
    fingerprint = "AB:" * 31 + "CD"
    mapper = PerDeviceMapper({fingerprint: CAMERA},
                             [(parse_network("192.0.2.0/24"), OFFICE),
                              (parse_network("192.0.2.10/32"), SCANNER)],
                             {"legacy": DEFAULT}, None)
    normal = fingerprint.replace(":", "").lower()
    assert mapper.map(client(certificate=normal), "") is CAMERA
    assert mapper.map(client(), "") is SCANNER  # the most specific network
    assert mapper.map(client(peer_host="192.0.2.11"), "") is OFFICE
    assert mapper.map(client(peer_host="::ffff:192.0.2.11"), "") is OFFICE
    assert mapper.map(client(peer_host="198.51.100.1", listener="legacy"), "") is DEFAULT
    text = refused(mapper, client(peer_host="198.51.100.1"))
    assert "[198.51.100.1] on listener smtps" in text


def test_passthrough_uses_the_clients_own_login():
    mapper = PassthroughMapper(ROUTE)
    secret = Secret("their-password")
    assignment = mapper.map(client(login="alice@example.com", password=secret), "")
    assert assignment.routes == ROUTE
    assert assignment.account.username == "alice@example.com"
    assert assignment.account.password is secret
    assert "their-password" not in repr(assignment)
    assert "without AUTH" in refused(mapper, client())


CONFIG = """
[[listener]]
name = "smtps"
endpoint = "tcp:465"
tls = "none"
auth = "optional"

[upstream]
host = "smtp.office365.com"

[upstream.gmail]
hosts = ["smtp.gmail.com", "smtp-relay.gmail.com"]
port = 465
tls = "implicit"

[account.scanner]
username = "scanner@example.com"
password_env = "SMTPBRIDGE_TEST_PASSWORD"
rewrite_sender = true

[account.office]
username = "office@example.com"
password_env = "SMTPBRIDGE_TEST_PASSWORD"
route = "gmail"
address = "info@example.com"
"""


@pytest.fixture(autouse=True)
def password(monkeypatch):
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "from-env")


def build(text: str, tmp_path) -> object:
    config = parse_config(text, str(tmp_path / "c.toml"))
    return config, upstreams(config, None).mapper


def test_routes_and_accounts_from_the_config(tmp_path):
    config, _ = build(CONFIG + '\n[credentials]\nmapper = "static"\naccount = "office"\n',
                      tmp_path)
    known = accounts(config)
    office = known["office"]
    assert [r.host for r in office.routes] == ["smtp.gmail.com", "smtp-relay.gmail.com"]
    assert {(r.port, r.tls) for r in office.routes} == {(465, "implicit")}
    assert office.account.rewrite_sender is None
    scanner = known["scanner"]
    assert scanner.routes == (Route("smtp.office365.com", 587, "starttls", None, 60.0),)
    assert scanner.account.rewrite_sender == "scanner@example.com"


def test_mappers_from_the_config(tmp_path):
    _, mapper = build(CONFIG + '[credentials]\nmapper = "per-sender"\ndefault = "office"\n'
                               '[credentials.map]\n"@scans.example.com" = "scanner"\n',
                      tmp_path)
    assert mapper.map(client(), "x@scans.example.com").account.name == "scanner"
    assert mapper.map(client(), "x@elsewhere.example").account.name == "office"
    (tmp_path / "users.map").write_text("# login account\nalice scanner\n\nbob office\n")
    _, mapper = build(CONFIG + '[credentials]\nmapper = "per-user"\nmap_file = "users.map"\n',
                      tmp_path)
    assert mapper.map(client(login="bob"), "").account.name == "office"
    _, mapper = build(CONFIG + '[credentials]\nmapper = "per-device"\n[credentials.map]\n'
                               '"listener:smtps" = "office"\n"network:192.0.2.0/28" = '
                               '"scanner"\n', tmp_path)
    assert mapper.map(client(), "").account.name == "scanner"
    assert mapper.map(client(peer_host="203.0.113.9"), "").account.name == "office"


@pytest.mark.parametrize("credentials, key, reason", [
    ('mapper = "static"\naccount = "nobody"\n', "credentials.account", "no account named"),
    ('mapper = "per-user"\ndefault = "nobody"\n', "credentials.default", "no account named"),
    ('mapper = "per-sender"\n[credentials.map]\n"not an address" = "office"\n',
     "credentials.map.not an address", "addresses or @domain"),
    ('mapper = "per-device"\n[credentials.map]\n"listener:nope" = "office"\n',
     "credentials.map.listener:nope", "no listener named"),
    ('mapper = "per-device"\n[credentials.map]\n"network:10.0.0.300/8" = "office"\n',
     "credentials.map.network:10.0.0.300/8", "not an IP network"),
    ('mapper = "per-device"\n[credentials.map]\n"certificate:abc" = "office"\n',
     "credentials.map.certificate:abc", "SHA-256 fingerprint"),
    ('mapper = "per-device"\n[credentials.map]\n"mac:00:11" = "office"\n',
     "credentials.map.mac:00:11", "listener:NAME, network:CIDR"),
    ('mapper = "not a name!"\n', "credentials.mapper", "is not a mapper name"),
    ('mapper = "passthrough"\nroute = "nowhere"\n', "credentials.route", "no route named"),
])
def test_mapping_mistakes(tmp_path, credentials, key, reason):
    with pytest.raises(ConfigError) as info:
        build(CONFIG + "[credentials]\n" + credentials, tmp_path)
    assert f": {key}: " in str(info.value) and reason in str(info.value)


def test_an_account_on_an_unknown_route(tmp_path):
    text = CONFIG.replace('route = "gmail"', 'route = "yahoo"') + "[credentials]\n"
    with pytest.raises(ConfigError) as info:
        build(text, tmp_path)
    assert "account.office.route: no route named 'yahoo'" in str(info.value)


def test_a_plugin_that_is_not_installed(tmp_path):
    with pytest.raises(ConfigError) as info:
        build(CONFIG + '[credentials]\nmapper = "ldap"\n', tmp_path)
    assert "credentials.mapper: no mapper named 'ldap' (plugins found:" in str(info.value)


def test_the_annotated_example_documents_every_mapper():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "etc", "smtpbridge.toml"), encoding="utf-8") as f:
        text = f.read()
    for name in ("static", "per-user", "per-sender", "per-device", "passthrough"):
        assert f'"{name}"' in text or name in text


def test_failover_and_login_checks_over_several_hosts():
    from twisted.internet.defer import fail, succeed

    from smtpbridge.connector import connect_first, try_login
    from smtpbridge.errors import LoginRejected
    from smtpbridge.model import Reply

    routes = (Route("a.example"), Route("b.example"), Route("c.example"))
    rejected = LoginRejected(Reply(454, "4.7.0", "rejected the login"))
    unreachable = SMTPReplyError(Reply(451, "4.4.1", "unreachable"))
    tried: list[str] = []

    class Session:
        def quit(self):
            return succeed(None)

    class Connector:
        def __init__(self, outcomes):
            self.outcomes = outcomes

        def connect(self, route, account):
            tried.append(route.host)
            outcome = self.outcomes[route.host]
            return fail(outcome) if isinstance(outcome, Exception) else succeed(outcome)

    connect_with = Connector

    def result(d):
        box = []
        d.addBoth(box.append)
        return box[0]

    # Relaying fails over past any setup failure, a refused login included.
    session = Session()
    connect = connect_with({"a.example": unreachable, "b.example": rejected,
                            "c.example": session})
    from twisted.internet.defer import Deferred
    assert result(Deferred.fromCoroutine(connect_first(connect, routes, None))) is session
    assert tried == ["a.example", "b.example", "c.example"]
    # When all fail, the refused login is the answer.
    tried.clear()
    connect = connect_with({"a.example": rejected, "b.example": unreachable,
                            "c.example": unreachable})
    assert result(Deferred.fromCoroutine(connect_first(connect, routes, None))).value \
        is rejected
    # Checking a client's own password stops at the first refusal.
    tried.clear()
    assert result(try_login(connect)(routes, UpstreamAccount("u", Secret("x")))) is False
    assert tried == ["a.example"]
