"""The TOML configuration: read once, checked completely, then frozen.

Every problem is a L{ConfigError} naming the file, the key and the reason.
Relative paths are taken relative to the directory of the configuration file.
Pure: no reactor, no sockets; it only reads the files the configuration names.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Callable
from typing import TypeVar

import attr

from smtpbridge.errors import ConfigError
from smtpbridge.model import TLS_VERSIONS
from smtpbridge.networks import Network, endpoint_kind, parse_network
from smtpbridge.opsconfig import (
    SPOOL_MODES,
    AdminConfig,
    LogConfig,
    RateLimitConfig,
    SpoolConfig,
    admin_table,
    log_table,
    rate_limits_table,
    spool_table,
)
from smtpbridge.secret import Secret
from smtpbridge.tomlreader import REQUIRED, Table
from smtpbridge.upstreamconfig import (
    DEFAULT,
    AccountConfig,
    CredentialsConfig,
    RouteConfig,
    check_name,
    credentials_table,
    parse_account,
    routes_table,
    sender_pattern,
)

__all__ = ["DEFAULT", "AccountConfig", "AdminConfig", "Config", "ConfigError",
           "CredentialsConfig", "LogConfig", "RateLimitConfig", "RouteConfig", "Secret",
           "load_config", "parse_config"]

T = TypeVar("T")

TLS_MODES = ("implicit", "starttls", "none")
AUTH_MODES = ("required", "optional")
CLIENT_CERTIFICATE_MODES = ("none", "request", "require")
DEFAULT_MAX_MESSAGE_SIZE = 36_700_160  # 35 MiB, like Microsoft 365's limit
MAX_CONFIG = 1024 * 1024  # bytes: a configuration file is far smaller
DEFAULT_TRUSTED_NETWORKS = (parse_network("127.0.0.0/8"), parse_network("::1/128"))


@attr.frozen
class ServerConfig:
    hostname: str
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    idle_timeout: int = 300
    received_header: bool = True
    received_header_login: bool = False  # name the AUTH login in Received:
    handshake_timeout: int = 30  # seconds for a TLS handshake (Postfix smtpd_starttls_timeout)
    max_session_time: int = 3600  # seconds a session may last in all
    max_connections: int = 1000  # per listener, unless the listener says otherwise
    max_connections_per_client: int = 50  # per client address (Postfix's default)
    allow_readable_secrets: bool = False  # group/world-readable secret files: warn only
    workers: int = 1  # processes that serve the listeners; more than 1: a supervisor too


@attr.frozen
class TLSConfig:
    certificate: str | None = None
    key: str | None = None
    create_self_signed: bool = False
    self_signed_names: tuple[str, ...] = ()  # more names and addresses for that certificate


@attr.frozen
class ListenerConfig:
    name: str
    endpoint: str
    tls: str
    auth: str = "required"
    min_tls_version: str = "1.2"
    allow_plaintext_auth: bool = False
    accept_bare_lf_end: bool = False
    require_helo: bool = False  # refuse MAIL and AUTH before HELO/EHLO (503)
    client_certificates: str = "none"
    client_ca: str | None = None
    certificate: str | None = None  # this listener's own certificate instead of [tls]'s
    key: str | None = None
    max_connections: int | None = None  # default: [server] max_connections
    backlog: int = 511  # the listen queue of a tcp endpoint
    spool: str | None = None  # this listener's spool mode; default: [spool] mode


@attr.frozen
class AccessConfig:
    trusted_networks: tuple[Network, ...] = DEFAULT_TRUSTED_NETWORKS
    users_file: str | None = None
    auth_failure_limit: int = 10
    auth_failure_window: float = 600.0
    auth_block_time: float = 900.0
    auth_failure_delay: float = 1.0
    auth_threads: int = 2  # password checks (scrypt, 32 MiB each) at once
    auth_queue: int = 32  # checks that may wait for a thread; beyond, 454 at once
    auth_rate: float = 20.0  # AUTH attempts per second for the whole bridge
    auth_cool_down: float = 10.0  # seconds an address refused AUTH is closed at connect
    login_cache_time: int = 3600  # seconds a verified password is taken without scrypt


@attr.frozen
class SendersConfig:
    """Which envelope senders local users and trusted networks may use."""

    users: dict[str, tuple[str, ...]] = attr.field(factory=dict)
    networks: tuple[tuple[Network, tuple[str, ...]], ...] = ()


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
    spool: SpoolConfig = SpoolConfig()
    log: LogConfig = LogConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    admin: AdminConfig | None = None
    warnings: tuple[str, ...] = ()  # what the administrator should hear about at start

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


def _required(root: Table, name: str, read: Callable[[Table], T]) -> T:
    value = _section(root, name, read, required=True)
    assert value is not None, "a required table is there or an error"
    return value


def _server(t: Table) -> ServerConfig:
    return ServerConfig(
        hostname=t.hostname("hostname", None) or socket.getfqdn(),
        max_message_size=t.integer("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, minimum=1024),
        idle_timeout=t.integer("idle_timeout", 300, minimum=1),
        received_header=t.boolean("received_header", True),
        received_header_login=t.boolean("received_header_login", False),
        handshake_timeout=t.integer("handshake_timeout", 30, minimum=1),
        max_session_time=t.integer("max_session_time", 3600, minimum=1),
        max_connections=t.integer("max_connections", 1000, minimum=1),
        max_connections_per_client=t.integer("max_connections_per_client", 50, minimum=1),
        allow_readable_secrets=t.boolean("allow_readable_secrets", False),
        workers=t.integer("workers", 1, minimum=1, maximum=64),
    )


def _tls(t: Table) -> TLSConfig:
    return TLSConfig(
        certificate=t.path("certificate", None),
        key=t.secret_path("key", None),
        create_self_signed=t.boolean("create_self_signed", False),
        self_signed_names=t.strings("self_signed_names", ()),
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
        require_helo=t.boolean("require_helo", False),
        client_certificates=t.string("client_certificates", "none",
                                     choices=CLIENT_CERTIFICATE_MODES),
        client_ca=t.path("client_ca", None),
        certificate=t.path("certificate", None),
        key=t.secret_path("key", None),
        max_connections=t.integer("max_connections", None, minimum=1),
        backlog=t.integer("backlog", 511, minimum=1, maximum=65535),
        spool=t.string("spool", None, choices=SPOOL_MODES),
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
        trusted_networks=_networks(t, "trusted_networks", DEFAULT_TRUSTED_NETWORKS),
        users_file=t.secret_path("users_file", None),
        auth_failure_limit=t.integer("auth_failure_limit", 10),
        auth_failure_window=t.number("auth_failure_window", 600.0, minimum=1.0),
        auth_block_time=t.number("auth_block_time", 900.0),
        auth_failure_delay=t.number("auth_failure_delay", 1.0),
        auth_threads=t.integer("auth_threads", 2, minimum=1, maximum=64),
        auth_queue=t.integer("auth_queue", 32, minimum=0),
        auth_rate=t.number("auth_rate", 20.0, minimum=0.1),
        auth_cool_down=t.number("auth_cool_down", 10.0),
        login_cache_time=t.integer("login_cache_time", 3600, minimum=0),
    )


def _senders(t: Table) -> SendersConfig:
    def lists(name: str) -> dict[str, tuple[str, ...]]:
        table = t.table(name)
        if table is None:
            return {}
        result = {key: table.strings(key) for key in table.data}
        for key, patterns in result.items():
            for pattern in patterns:
                if not sender_pattern(pattern):
                    raise table.error(key, f"{pattern!r} is neither an address nor @domain")
        return result

    networks = []
    for network, patterns in lists("networks").items():
        try:
            networks.append((parse_network(network), patterns))
        except ValueError:
            raise t.error(f"networks.{network}", "is not an IP network")
    return SendersConfig(users=lists("users"), networks=tuple(networks))


def _networks(t: Table, key: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
    values = t.get(key, list, None)
    if values is None:
        return default
    try:
        return tuple(parse_network(value) for value in values)
    except ValueError as e:
        raise t.error(key, str(e))


def _demo(t: Table) -> DemoConfig:
    password = t.secret("password")
    if password is None:
        raise t.error("password_file", "required key is missing")
    return DemoConfig(
        endpoint=t.string("endpoint"),
        mail_dir=t.path("mail_dir"),
        username=t.string("username"),
        password=password,
    )


def parse_config(text: str, path: str) -> Config:
    """Check and freeze the configuration held in C{text}, read from C{path}."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, f"not valid TOML: {e}")
    root = Table(path, "", data, os.path.dirname(os.path.abspath(path)))
    listeners_data = root.get("listener", list, REQUIRED)
    listeners = []
    for index, item in enumerate(listeners_data):
        table = root.sub(f"listener[{index}]", item)
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
            check_name(table, name)
            accounts[name] = parse_account(table, name)
            table.done()
        account_tables.done()

    config = Config(
        path=path,
        server=_section(root, "server", _server) or ServerConfig(hostname=socket.getfqdn()),
        tls=_section(root, "tls", _tls) or TLSConfig(),
        listeners=tuple(listeners),
        access=_section(root, "access", _access) or AccessConfig(),
        routes=_required(root, "upstream", routes_table),
        accounts=accounts,
        credentials=_required(root, "credentials", lambda t: credentials_table(t, accounts)),
        senders=_section(root, "senders", _senders) or SendersConfig(),
        demo=_section(root, "demo", _demo),
        spool=_section(root, "spool", spool_table) or SpoolConfig(),
        log=_section(root, "log", log_table) or LogConfig(),
        rate_limits=_section(root, "rate_limits", rate_limits_table) or RateLimitConfig(),
        admin=_section(root, "admin", admin_table),
    )
    root.done()
    _check_whole(config)
    return attr.evolve(config, warnings=_check_secret_files(config, root.secret_files))


def _check_secret_files(config: Config, files: list[tuple[str, str]]) -> tuple[str, ...]:
    """Refuse secret files that others may read, as ssh does (a warning instead with
    allow_readable_secrets); the warnings."""
    warnings = []
    for key, path in files:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a missing file is reported where it is read
        if not mode & 0o044:
            continue
        who = "its group and others" if mode & 0o004 and mode & 0o040 else (
            "others" if mode & 0o004 else "its group")
        reason = f"{path} can be read by {who} (mode {mode & 0o777:04o}): chmod 600 {path}"
        if not config.server.allow_readable_secrets:
            raise ConfigError(config.path, key, reason + " (or set [server] "
                                                         "allow_readable_secrets = true)")
        warnings.append(f"{config.path}: {key}: {reason}")
    return tuple(warnings)


def _check_whole(config: Config) -> None:
    """Rules that span tables: TLS material, routes the accounts name."""
    def fail(key: str, reason: str) -> ConfigError:
        return ConfigError(config.path, key, reason)

    for index, listener in enumerate(config.listeners):
        if listener.tls != "none" and listener.certificate is None:
            if not config.tls.certificate or not config.tls.key:
                raise fail("tls.certificate", f"listener {listener.name!r} uses TLS, so [tls] "
                                              "certificate and key are required")
        kind = endpoint_kind(listener.endpoint)
        if config.server.workers > 1 and (kind == "unix" or "domain=UNIX" in listener.endpoint):
            raise fail(f"listener[{index}].endpoint", "workers above 1 share TCP sockets only; "
                                                      "a UNIX socket needs [server] workers = 1")
    for account in config.accounts.values():
        if account.route not in config.routes:
            raise fail(f"{account.origin}.route", f"no route named {account.route!r} "
                                                  f"(routes: {', '.join(config.routes)})")


def load_config(path: str) -> Config:
    """Read and check the configuration file at C{path}."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
    except OSError as e:
        raise ConfigError(path, None, f"cannot read configuration: {e.strerror}")
    if len(raw) > MAX_CONFIG:
        raise ConfigError(path, None, f"larger than {MAX_CONFIG // 1024 // 1024} MiB: "
                          "not a configuration")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not UTF-8 text")
    return parse_config(text, path)
