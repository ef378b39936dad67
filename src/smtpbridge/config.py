"""The TOML configuration: read once, checked completely, then frozen.

Every problem is a L{ConfigError} naming the file, the key and the reason.
Relative paths are taken relative to the directory of the configuration file.
Pure: no reactor, no sockets; it only reads the files the configuration names.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable
from typing import TypeVar

import attr

from smtpbridge.errors import ConfigError
from smtpbridge.secret import Secret
from smtpbridge.tomlreader import REQUIRED, Table
from smtpbridge.upstreamconfig import (
    DEFAULT,
    AccountConfig,
    CredentialsConfig,
    RouteConfig,
    check_map_key,
    check_name,
    credentials_table,
    parse_account,
    routes_table,
    sender_pattern,
)

__all__ = ["DEFAULT", "AccountConfig", "Config", "ConfigError", "CredentialsConfig",
           "RouteConfig", "Secret", "load_config", "parse_config"]

T = TypeVar("T")

TLS_MODES = ("implicit", "starttls", "none")
AUTH_MODES = ("required", "optional")
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
CLIENT_CERTIFICATE_MODES = ("none", "request", "require")
DEFAULT_MAX_MESSAGE_SIZE = 36_700_160  # 35 MiB, like Microsoft 365's limit
DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")


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

    return SendersConfig(users=lists("users"), networks=lists("networks"))


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
        routes=_section(root, "upstream", routes_table, required=True),
        accounts=accounts,
        credentials=_section(root, "credentials", lambda t: credentials_table(t, accounts),
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
            check_map_key(config, mapper, key)
    if mapper == "passthrough" and credentials.route not in config.routes:
        raise fail("credentials.route", f"no route named {credentials.route!r}")
    for network in config.senders.networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise fail(f"senders.networks.{network}", "is not an IP network")


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
