"""The upstream half of the configuration: routes, accounts (OAuth2 included) and how
transactions are mapped to accounts.  Read by L{smtpbridge.config}."""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Any

import attr

from smtpbridge.errors import ConfigError
from smtpbridge.secret import Secret
from smtpbridge.tomlreader import Table

BUILTIN_MAPPERS = ("static", "per-user", "per-sender", "per-device", "passthrough")
MECHANISMS = ("auto", "plain", "login", "xoauth2", "oauthbearer")
GRANTS = ("refresh_token", "client_credentials", "token_file")
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
    oauth: Any = None  # smtpbridge.oauth.OAuthSettings when the account logs in with OAuth2


@attr.frozen
class CredentialsConfig:
    """How transactions are mapped to accounts."""

    mapper: str = "static"
    account: str = DEFAULT  # static: the one account
    default: str | None = None  # per-user/-sender/-device: the account when nothing matches
    route: str = DEFAULT  # passthrough: the route the clients' own logins are used on
    map: tuple[tuple[str, str], ...] = ()  # key -> account name, in the order written
    options: dict[str, Any] = attr.field(factory=dict)  # a plugin mapper's own table


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
        min_tls_version=t.string("min_tls_version", "1.2", choices=("1.2", "1.3")),
        pin_sha256=tuple(_pin(t, value) for value in t.strings("pin_sha256", ())),
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
    oauth_table = t.table("oauth")
    oauth = None
    if oauth_table is not None:
        oauth = _oauth(oauth_table)
        oauth_table.done()
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


TOKEN_URLS = {
    "google": "https://oauth2.googleapis.com/token",
    "microsoft": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
}


def _oauth(t: Table) -> Any:
    """``[account.NAME.oauth]``: where and how the account's access tokens are obtained."""
    from smtpbridge.oauth import OAuthSettings

    grant = t.string("grant", choices=GRANTS)
    provider = t.string("provider", None, choices=tuple(TOKEN_URLS))
    tenant = t.string("tenant", None)
    token_url = t.string("token_url", None)
    if token_url is None and provider == "microsoft":
        if tenant is None:
            raise t.error("tenant", 'required for provider = "microsoft" (your tenant ID '
                                    "or domain, e.g. contoso.onmicrosoft.com)")
        token_url = TOKEN_URLS["microsoft"].format(tenant=tenant)
    elif token_url is None and provider == "google":
        token_url = TOKEN_URLS["google"]
    elif tenant is not None and provider != "microsoft":
        raise t.error("tenant", 'only used with provider = "microsoft"')
    settings = OAuthSettings(
        grant=grant,
        token_url=token_url,
        client_id=t.string("client_id", None),
        client_secret=t.secret("client_secret"),
        client_certificate=t.path("client_certificate", None),
        client_key=t.path("client_key", None),
        scope=t.string("scope", None),
        refresh_token_file=t.path("refresh_token_file", None),
        token_file=t.path("token_file", None),
        ca_certificates=t.path("ca_certificates", None),
        timeout=t.number("timeout", 30.0, minimum=1.0),
    )
    needs = {
        "refresh_token": ("token_url", "client_id", "refresh_token_file"),
        "client_credentials": ("token_url", "client_id", "scope"),
        "token_file": ("token_file",),
    }[grant]
    for key in needs:
        if getattr(settings, key) is None:
            hint = " (or provider)" if key == "token_url" else ""
            raise t.error(key, f"required for grant = {grant!r}{hint}")
    if grant == "client_credentials":
        has_secret = settings.client_secret is not None
        has_certificate = settings.client_certificate is not None
        if has_secret == has_certificate:
            raise t.error("client_secret", "give client_secret_file/_env, or "
                                           "client_certificate and client_key, not both")
        if has_certificate and settings.client_key is None:
            raise t.error("client_key", "required with client_certificate")
    if settings.token_url is not None and not settings.token_url.startswith("https://"):
        raise t.error("token_url", "must be an https:// URL")
    return settings


def _map(t: Table) -> tuple[tuple[str, str], ...]:
    entries = []
    map_table = t.table("map")
    if map_table is not None:
        for key in map_table.data:
            entries.append((key, map_table.string(key)))
    map_file = t.path("map_file", None)
    if map_file is not None:
        entries += _read_map_file(t, map_file)
    return tuple(entries)


def _read_map_file(t: Table, path: str) -> list[tuple[str, str]]:
    """A map file: one "key account" pair per line; blank lines and # comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise t.error("map_file", f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(path, f"line {number}", "expected: <key> <account>")
        entries.append((parts[0], parts[1]))
    return entries


def credentials_table(t: Table, accounts: dict[str, AccountConfig]) -> CredentialsConfig:
    """``[credentials]``: the mapper and its settings; username/password here are the
    account "default" (the single-account form)."""
    if "username" in t.data or any(key.startswith("password") for key in t.data):
        if DEFAULT in accounts:
            raise t.error("username", "an [account.default] table exists already")
        accounts[DEFAULT] = parse_account(t, DEFAULT)
    mapper = t.string("mapper", "static")
    if mapper not in BUILTIN_MAPPERS and not _NAME.match(mapper):
        raise t.error("mapper", f"{mapper!r} is neither a built-in mapper "
                                f"({', '.join(BUILTIN_MAPPERS)}) nor a plugin name")
    options = t.table("options")
    return CredentialsConfig(
        mapper=mapper,
        account=t.string("account", DEFAULT),
        default=t.string("default", None),
        route=t.string("route", DEFAULT),
        map=_map(t),
        options=dict(options.data) if options is not None else {},
    )


def sender_pattern(pattern: str) -> bool:
    local, at, domain = pattern.rpartition("@")
    return bool(at and domain and " " not in pattern)


def check_name(t: Table, name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(t.file, t.name, "names use letters, digits, '.', '_' and '-'")


def check_map_key(config: Any, mapper: str, key: str) -> None:
    def fail(reason: str) -> ConfigError:
        return ConfigError(config.path, f"credentials.map.{key}", reason)

    if mapper == "per-sender" and not sender_pattern(key):
        raise fail("per-sender keys are addresses or @domain")
    if mapper != "per-device":
        return
    kind, _, value = key.partition(":")
    if kind == "listener":
        if value not in {listener.name for listener in config.listeners}:
            raise fail(f"no listener named {value!r}")
    elif kind == "network":
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise fail(f"{value!r} is not an IP network")
    elif kind == "certificate":
        if not re.fullmatch(r"[0-9a-fA-F:]{64,95}", value) or \
                len(value.replace(":", "")) != 64:
            raise fail("expected the SHA-256 fingerprint of a client certificate (64 hex digits)")
    else:
        raise fail("per-device keys are listener:NAME, network:CIDR or certificate:SHA256")
