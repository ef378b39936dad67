"""The TOML configuration: read once, checked completely, then frozen.

Every problem is a L{ConfigError} naming the file, the key and the reason.
Relative paths are taken relative to the directory of the configuration file.
Pure: no reactor, no sockets; it only reads the files the configuration names.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar

import attr

from smtpbridge.errors import ConfigError
from smtpbridge.secret import Secret
from smtpbridge.tomlreader import REQUIRED, Table

__all__ = ["Config", "ConfigError", "Secret", "load_config", "parse_config"]

T = TypeVar("T")

TLS_MODES = ("implicit", "starttls", "none")
AUTH_MODES = ("required", "optional")
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
CLIENT_CERTIFICATE_MODES = ("none", "request", "require")
BUILTIN_MAPPERS = ("static", "per-user", "per-sender", "per-device", "passthrough")
MECHANISMS = ("auto", "plain", "login", "xoauth2", "oauthbearer")
GRANTS = ("refresh_token", "client_credentials", "token_file")
DEFAULT_MAX_MESSAGE_SIZE = 36_700_160  # 35 MiB, like Microsoft 365's limit
DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")
DEFAULT = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADDRESS = re.compile(r"^[^\s<>()@,;:\\\"\[\]]+@[^\s<>()@,;:\\\"\[\]]+\.[^\s<>()@,;:\\\"\[\]]+$")


@attr.frozen
class ServerConfig:
    hostname: str
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    idle_timeout: int = 300
    received_header: bool = True


@attr.frozen
class TLSConfig:
    certificate: str | None = None
    key: str | None = None
    create_self_signed: bool = False


@attr.frozen
class ListenerConfig:
    name: str
    endpoint: str
    tls: str
    auth: str = "required"
    min_tls_version: str = "1.2"
    allow_plaintext_auth: bool = False
    accept_bare_lf_end: bool = False
    client_certificates: str = "none"
    client_ca: str | None = None
    certificate: str | None = None  # this listener's own certificate instead of [tls]'s
    key: str | None = None


@attr.frozen
class AccessConfig:
    trusted_networks: tuple[str, ...] = DEFAULT_TRUSTED_NETWORKS
    users_file: str | None = None
    auth_failure_limit: int = 10
    auth_failure_window: float = 600.0
    auth_block_time: float = 900.0
    auth_failure_delay: float = 1.0


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


@attr.frozen
class SendersConfig:
    """Which envelope senders local users and trusted networks may use."""

    users: dict[str, tuple[str, ...]] = attr.field(factory=dict)
    networks: dict[str, tuple[str, ...]] = attr.field(factory=dict)


@attr.frozen
class DemoConfig:
    """The embedded demo upstream: an SMTP server that stores messages as files."""

    endpoint: str
    mail_dir: str
    username: str
    password: Secret


@attr.frozen
class Config:
    path: str
    server: ServerConfig
    tls: TLSConfig
    listeners: tuple[ListenerConfig, ...]
    access: AccessConfig
    routes: dict[str, RouteConfig]
    accounts: dict[str, AccountConfig]
    credentials: CredentialsConfig
    senders: SendersConfig
    demo: DemoConfig | None

    @property
    def upstream(self) -> RouteConfig:
        """The default route (the plain ``[upstream]`` table)."""
        return self.routes[DEFAULT]


def _section(root: Table, name: str, read: Callable[[Table], T],
             required: bool = False) -> T | None:
    table = root.table(name, required)
    if table is None:
        return None
    value = read(table)
    table.done()
    return value


def _server(t: Table) -> ServerConfig:
    return ServerConfig(
        hostname=t.string("hostname", socket.getfqdn()),
        max_message_size=t.integer("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, minimum=1024),
        idle_timeout=t.integer("idle_timeout", 300, minimum=10),
        received_header=t.boolean("received_header", True),
    )


def _tls(t: Table) -> TLSConfig:
    return TLSConfig(
        certificate=t.path("certificate", None),
        key=t.path("key", None),
        create_self_signed=t.boolean("create_self_signed", False),
    )


def _listener(t: Table) -> ListenerConfig:
    listener = ListenerConfig(
        name=t.string("name"),
        endpoint=t.string("endpoint"),
        tls=t.string("tls", choices=TLS_MODES),
        auth=t.string("auth", "required", choices=AUTH_MODES),
        min_tls_version=t.string("min_tls_version", "1.2", choices=TLS_VERSIONS),
        allow_plaintext_auth=t.boolean("allow_plaintext_auth", False),
        accept_bare_lf_end=t.boolean("accept_bare_lf_end", False),
        client_certificates=t.string("client_certificates", "none",
                                     choices=CLIENT_CERTIFICATE_MODES),
        client_ca=t.path("client_ca", None),
        certificate=t.path("certificate", None),
        key=t.path("key", None),
    )
    if (listener.certificate is None) != (listener.key is None):
        raise t.error("certificate" if listener.certificate is None else "key",
                      "a listener's own certificate needs both certificate and key")
    nobody_can_send = listener.auth == "required" and not listener.allow_plaintext_auth
    if listener.tls == "none" and nobody_can_send:
        raise t.error("auth", 'a listener with tls = "none" and auth = "required" accepts '
                              'no one; set allow_plaintext_auth = true or auth = "optional"')
    if listener.client_certificates != "none":
        if listener.tls == "none":
            raise t.error("client_certificates", 'needs tls = "implicit" or "starttls"')
        if listener.client_ca is None:
            raise t.error("client_ca", "required when client_certificates is "
                                       f"{listener.client_certificates!r}")
    return listener


def _access(t: Table) -> AccessConfig:
    return AccessConfig(
        trusted_networks=t.strings("trusted_networks", DEFAULT_TRUSTED_NETWORKS),
        users_file=t.path("users_file", None),
        auth_failure_limit=t.integer("auth_failure_limit", 10),
        auth_failure_window=t.number("auth_failure_window", 600.0, minimum=1.0),
        auth_block_time=t.number("auth_block_time", 900.0),
        auth_failure_delay=t.number("auth_failure_delay", 1.0),
    )


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


def _routes(t: Table) -> dict[str, RouteConfig]:
    """``[upstream]`` is the route "default"; ``[upstream.NAME]`` tables are named routes."""
    routes = {}
    for name, table in t.tables():
        _check_name(table, name)
        routes[name] = _route(table, name)
        table.done()
    if any(not isinstance(value, dict) for value in t.data.values()):
        if DEFAULT in routes:
            raise t.error(DEFAULT, "the route 'default' is the plain [upstream] table")
        routes[DEFAULT] = _route(t, DEFAULT)
    if not routes:
        raise t.error("host", "required key is missing")
    return routes


def _account(t: Table, name: str) -> AccountConfig:
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


def _credentials(t: Table, accounts: dict[str, AccountConfig]) -> CredentialsConfig:
    """``[credentials]``: the mapper and its settings; username/password here are the
    account "default" (the single-account form)."""
    if "username" in t.data or any(key.startswith("password") for key in t.data):
        if DEFAULT in accounts:
            raise t.error("username", "an [account.default] table exists already")
        accounts[DEFAULT] = _account(t, DEFAULT)
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


def _senders(t: Table) -> SendersConfig:
    def lists(name: str) -> dict[str, tuple[str, ...]]:
        table = t.table(name)
        if table is None:
            return {}
        result = {key: table.strings(key) for key in table.data}
        for key, patterns in result.items():
            for pattern in patterns:
                if not _sender_pattern(pattern):
                    raise table.error(key, f"{pattern!r} is neither an address nor @domain")
        return result

    return SendersConfig(users=lists("users"), networks=lists("networks"))


def _sender_pattern(pattern: str) -> bool:
    local, at, domain = pattern.rpartition("@")
    return bool(at and domain and " " not in pattern)


def _demo(t: Table) -> DemoConfig:
    demo = DemoConfig(
        endpoint=t.string("endpoint"),
        mail_dir=t.path("mail_dir"),
        username=t.string("username"),
        password=t.secret("password"),
    )
    if demo.password is None:
        raise t.error("password_file", "required key is missing")
    return demo


def _check_name(t: Table, name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(t.file, t.name, "names use letters, digits, '.', '_' and '-'")


def parse_config(text: str, path: str) -> Config:
    """Check and freeze the configuration held in C{text}, read from C{path}."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, f"not valid TOML: {e}")
    root = Table(path, "", data, os.path.dirname(os.path.abspath(path)))
    listeners_data = root._get("listener", list, REQUIRED)
    listeners = []
    for index, item in enumerate(listeners_data):
        table = Table(path, f"listener[{index}]", item, root.base_dir)
        listeners.append(_listener(table))
        table.done()
    if not listeners:
        raise ConfigError(path, "listener", "at least one [[listener]] is needed")
    names = [listener.name for listener in listeners]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(path, f"listener[{index}].name", f"duplicate listener name {name!r}")

    accounts: dict[str, AccountConfig] = {}
    account_tables = root.table("account")
    if account_tables is not None:
        for name, table in account_tables.tables():
            _check_name(table, name)
            accounts[name] = _account(table, name)
            table.done()
        account_tables.done()

    config = Config(
        path=path,
        server=_section(root, "server", _server) or ServerConfig(hostname=socket.getfqdn()),
        tls=_section(root, "tls", _tls) or TLSConfig(),
        listeners=tuple(listeners),
        access=_section(root, "access", _access) or AccessConfig(),
        routes=_section(root, "upstream", _routes, required=True),
        accounts=accounts,
        credentials=_section(root, "credentials", lambda t: _credentials(t, accounts),
                             required=True),
        senders=_section(root, "senders", _senders) or SendersConfig(),
        demo=_section(root, "demo", _demo),
    )
    root.done()
    _check_whole(config)
    return config


def _check_whole(config: Config) -> None:
    """Rules that span tables: TLS material, names that must exist, networks that must parse."""
    def fail(key: str, reason: str) -> ConfigError:
        return ConfigError(config.path, key, reason)

    for listener in config.listeners:
        if listener.tls != "none" and listener.certificate is None:
            if not config.tls.certificate or not config.tls.key:
                raise fail("tls.certificate", f"listener {listener.name!r} uses TLS, so [tls] "
                                              "certificate and key are required")
    credentials = config.credentials
    for account in config.accounts.values():
        where = account.origin
        if account.route not in config.routes:
            raise fail(f"{where}.route", f"no route named {account.route!r} "
                                         f"(routes: {', '.join(config.routes)})")
        if account.password is None and account.oauth is None and \
                credentials.mapper != "passthrough":
            raise fail(f"{where}.password_file", "the upstream password is missing: "
                                                 "give password_file or password_env")

    def need_account(key: str, name: str) -> None:
        if name not in config.accounts:
            known = ", ".join(config.accounts) or "none"
            raise fail(key, f"no account named {name!r} (accounts: {known})")

    mapper = credentials.mapper
    if mapper == "static" and not config.accounts:
        raise fail("credentials.username", "required key is missing")
    if mapper == "static":
        need_account("credentials.account", credentials.account)
    if mapper in ("per-user", "per-sender", "per-device"):
        if credentials.default is not None:
            need_account("credentials.default", credentials.default)
        for key, account in credentials.map:
            need_account(f"credentials.map.{key}", account)
            _check_map_key(config, mapper, key)
    if mapper == "passthrough" and credentials.route not in config.routes:
        raise fail("credentials.route", f"no route named {credentials.route!r}")
    for network in config.senders.networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise fail(f"senders.networks.{network}", "is not an IP network")


def _check_map_key(config: Config, mapper: str, key: str) -> None:
    def fail(reason: str) -> ConfigError:
        return ConfigError(config.path, f"credentials.map.{key}", reason)

    if mapper == "per-sender" and not _sender_pattern(key):
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


def load_config(path: str) -> Config:
    """Read and check the configuration file at C{path}."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read configuration: {e.strerror}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not UTF-8 text")
    return parse_config(text, path)
