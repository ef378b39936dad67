"""The upstream half of the configuration: routes, accounts (OAuth2 included) and how
transactions are mapped to accounts.  Read by L{smtpbridge.config}."""

from __future__ import annotations

import base64
import re
from typing import Any

import attr

from smtpbridge.errors import ConfigError
from smtpbridge.model import UPSTREAM_TLS_VERSIONS
from smtpbridge.oauthconfig import OAuthSettings, oauth_table
from smtpbridge.secret import Secret
from smtpbridge.tomlreader import Table

MECHANISMS = ("auto", "plain", "login", "xoauth2", "oauthbearer")
DEFAULT = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADDRESS = re.compile(r"^[^\s<>()@,;:\\\"\[\]]+@[^\s<>()@,;:\\\"\[\]]+\.[^\s<>()@,;:\\\"\[\]]+$")


@attr.frozen
class RouteConfig:
    """One upstream route: hosts tried in order, port, TLS mode, CA bundle."""

    name: str
    hosts: tuple[str, ...]
    port: int = 587
    tls: str = "starttls"
    ca_certificates: str | None = None
    timeout: int = 60
    min_tls_version: str = "1.2"
    pin_sha256: tuple[str, ...] = ()
    max_sessions: int = 20  # upstream sessions open at once, per host
    session_wait: int = 30  # seconds a transaction waits for one before 451 4.3.2
    data_timeout: int = 180  # seconds the body may make no progress (Postfix's default)
    session_idle: int = 30  # seconds a logged-in session is kept for the next message
    max_messages_per_session: int = 100  # messages one session carries, then it is closed


@attr.frozen
class AccountConfig:
    """One upstream login and the route it uses."""

    name: str
    username: str
    password: Secret | None
    origin: str  # the table it was written in, for error messages
    route: str = DEFAULT
    rewrite_sender: bool = False
    address: str | None = None  # the sender address rewrite_sender uses; default: username
    mechanism: str = "auto"  # auto | plain | login | xoauth2 | oauthbearer
    oauth: OAuthSettings | None = None  # when the account logs in with OAuth2


@attr.frozen
class CredentialsConfig:
    """How transactions are mapped to accounts: the mapper's name and its options, which
    the mapper checks itself (the keys of ``[credentials]`` and ``[credentials.options]``;
    values of keys ending in ``_file`` are paths, relative to the configuration file)."""

    mapper: str = "static"
    options: dict[str, Any] = attr.field(factory=dict)


def _route(t: Table, name: str) -> RouteConfig:
    host = t.string("host", None)
    hosts = t.strings("hosts", None)
    if (host is None) == (hosts is None):
        raise t.error("host", "give either host or hosts (a list tried in order)")
    hosts = (host,) if host is not None else hosts
    if not hosts or any(not h for h in hosts):
        raise t.error("hosts", "must name at least one host, none empty")
    return RouteConfig(
        name=name,
        hosts=tuple(hosts),
        port=t.integer("port", 587, minimum=1, maximum=65535),
        tls=t.string("tls", "starttls", choices=("starttls", "implicit")),
        ca_certificates=t.path("ca_certificates", ""),
        timeout=t.integer("timeout", 60, minimum=1),
        min_tls_version=t.string("min_tls_version", "1.2", choices=UPSTREAM_TLS_VERSIONS),
        pin_sha256=tuple(_pin(t, value) for value in t.strings("pin_sha256", ())),
        max_sessions=t.integer("max_sessions", 20, minimum=1),
        session_wait=t.integer("session_wait", 30, minimum=0),
        data_timeout=t.integer("data_timeout", 180, minimum=1),
        session_idle=t.integer("session_idle", 30, minimum=0),
        max_messages_per_session=t.integer("max_messages_per_session", 100, minimum=1),
    )


def _pin(t: Table, value: str) -> str:
    """A public key pin as base64 of 32 bytes; "sha256/" in front is allowed."""
    text = value.removeprefix("sha256/")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise t.error("pin_sha256", f"{value!r} is not a base64 SHA-256 pin (44 characters)")
    return text


def routes_table(t: Table) -> dict[str, RouteConfig]:
    """``[upstream]`` is the route "default"; ``[upstream.NAME]`` tables are named routes."""
    routes = {}
    for name, table in t.tables():
        check_name(table, name)
        routes[name] = _route(table, name)
        table.done()
    if any(not isinstance(value, dict) for value in t.data.values()):
        if DEFAULT in routes:
            raise t.error(DEFAULT, "the route 'default' is the plain [upstream] table")
        routes[DEFAULT] = _route(t, DEFAULT)
    if not routes:
        raise t.error("host", "required key is missing")
    return routes


def parse_account(t: Table, name: str) -> AccountConfig:
    section = t.table("oauth")
    oauth = None
    if section is not None:
        oauth = oauth_table(section)
        section.done()
    account = AccountConfig(
        name=name,
        username=t.string("username"),
        password=t.secret("password"),
        origin=t.name,
        route=t.string("route", DEFAULT),
        rewrite_sender=t.boolean("rewrite_sender", False),
        address=t.string("address", None),
        mechanism=t.string("mechanism", "auto", choices=MECHANISMS),
        oauth=oauth,
    )
    if account.rewrite_sender:
        address = account.address or account.username
        if not _ADDRESS.match(address):
            key = "address" if account.address else "rewrite_sender"
            raise t.error(key, f"rewrite_sender needs a plain address such as "
                               f"user@example.com, not {address!r}"
                               + ("" if account.address else "; set address"))
    if oauth is not None and account.password is not None:
        raise t.error("password_file", "an OAuth2 account has no password; remove it")
    if account.mechanism in ("xoauth2", "oauthbearer") and oauth is None:
        raise t.error("mechanism", f"{account.mechanism} needs an [{t.name}.oauth] table")
    if account.mechanism in ("plain", "login") and oauth is not None:
        raise t.error("mechanism", f"{account.mechanism} is a password mechanism; "
                                   "use xoauth2, oauthbearer or auto")
    return account


def credentials_table(t: Table, accounts: dict[str, AccountConfig]) -> CredentialsConfig:
    """``[credentials]``: the mapper and its options; username/password here are the
    account "default" (the single-account form)."""
    if "username" in t.data or any(key.startswith("password") for key in t.data):
        if DEFAULT in accounts:
            raise t.error("username", "an [account.default] table exists already")
        accounts[DEFAULT] = parse_account(t, DEFAULT)
    account_keys = set(t.used)
    mapper = t.string("mapper", "static")
    if not _NAME.match(mapper):
        raise t.error("mapper", f"{mapper!r} is not a mapper name (letters, digits, '.', "
                                "'_' and '-')")
    options: dict[str, Any] = {}
    section = t.table("options")
    sources = [(t, account_keys | {"mapper", "options"})]
    if section is not None:
        sources.append((section, set()))
    for table, skip in sources:
        for key, value in table.data.items():
            if key in skip:
                continue
            if key in options:
                raise table.error(key, "given twice: in [credentials] and [credentials.options]")
            options[key] = table.path(key) if key.endswith("_file") and \
                isinstance(value, str) else value
        table.used.update(table.data)
    return CredentialsConfig(mapper=mapper, options=options)


def sender_pattern(pattern: str) -> bool:
    local, at, domain = pattern.rpartition("@")
    return bool(at and domain and " " not in pattern)


def check_name(t: Table, name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(t.file, t.name, "names use letters, digits, '.', '_' and '-'")
