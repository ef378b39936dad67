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
from typing import Any, TypeVar

import attr

from smtpbridge.errors import ConfigError

T = TypeVar("T")

TLS_MODES = ("implicit", "starttls", "none")
AUTH_MODES = ("required", "optional")
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
DEFAULT_MAX_MESSAGE_SIZE = 36_700_160  # 35 MiB, like Microsoft 365's limit
DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")


@attr.frozen(repr=False)
class Secret:
    """A password or token: its value never shows in a repr, a log line or an error."""

    value: str

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__


@attr.frozen
class ServerConfig:
    hostname: str
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    idle_timeout: int = 300


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


@attr.frozen
class AccessConfig:
    trusted_networks: tuple[str, ...] = DEFAULT_TRUSTED_NETWORKS
    users_file: str | None = None


@attr.frozen
class UpstreamConfig:
    host: str
    port: int = 587
    tls: str = "starttls"
    ca_certificates: str | None = None
    timeout: int = 60


@attr.frozen
class CredentialsConfig:
    mapper: str = "static"
    username: str | None = None
    password: Secret | None = None


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
    upstream: UpstreamConfig
    credentials: CredentialsConfig
    demo: DemoConfig | None


_REQUIRED: Any = object()


class _Table:
    """Reads one TOML table, remembering which keys were used to reject the rest."""

    def __init__(self, file: str, name: str, data: Any, base_dir: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(file, name, f"must be a table, not {_type_name(data)}")
        self.file = file
        self.name = name
        self.data = data
        self.base_dir = base_dir
        self._used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key(key) if key else self.name, reason)

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self._used.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(key, "required key is missing")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "value"
            raise self.error(key, f"expected {_NAMES.get(expected, expected)}, "
                                  f"got {_type_name(value)}")
        return value

    def string(self, key: str, default: Any = _REQUIRED, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(key, str, default)
        if isinstance(value, str) and choices and value not in choices:
            raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, "
                                  f"not {value!r}")
        if value == "" and default is _REQUIRED:
            raise self.error(key, "must not be empty")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 0,
                maximum: int | None = None) -> Any:
        value = self._get(key, int, default)
        if isinstance(value, int) and (value < minimum or maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"{minimum}..{maximum}"
            raise self.error(key, f"must be {bounds}, not {value}")
        return value

    def boolean(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._get(key, bool, default)

    def strings(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, list, default)
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, str):
                    raise self.error(key, f"expected a list of strings, found {_type_name(item)}")
            return tuple(value)
        return value

    def path(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.string(key, default)
        if not value:
            return None if value == "" else value
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def secret(self, key: str) -> Secret | None:
        """A secret given as ``<key>_file`` (a file holding it) or ``<key>_env`` (a variable)."""
        from_file = self.path(f"{key}_file", None)
        from_env = self.string(f"{key}_env", None)
        if key in self.data:
            self._used.add(key)
            raise self.error(key, f"secrets are not written in the config; "
                                  f"use {key}_file or {key}_env")
        if from_file and from_env:
            raise self.error(f"{key}_file", f"give either {key}_file or {key}_env, not both")
        if from_file:
            try:
                with open(from_file, encoding="utf-8") as f:
                    value = f.read().strip("\r\n")
            except OSError as e:
                raise self.error(f"{key}_file", f"cannot read {from_file}: {e.strerror}")
            except UnicodeDecodeError:
                raise self.error(f"{key}_file", f"{from_file} is not UTF-8 text")
            if not value:
                raise self.error(f"{key}_file", f"{from_file} is empty")
            return Secret(value)
        if from_env:
            value = os.environ.get(from_env)
            if not value:
                raise self.error(f"{key}_env", f"environment variable {from_env} is not set")
            return Secret(value)
        return None

    def table(self, key: str, required: bool = False) -> _Table | None:
        self._used.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "required table is missing")
            return None
        return _Table(self.file, self.key(key), self.data[key], self.base_dir)

    def done(self) -> None:
        for key in self.data:
            if key not in self._used:
                raise self.error(key, "unknown key")


_NAMES = {"str": "a string", "int": "an integer", "bool": "true or false", "list": "a list",
          "dict": "a table"}


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return _NAMES.get(type(value).__name__, type(value).__name__)


def _section(root: _Table, name: str, read: Callable[[_Table], T],
             required: bool = False) -> T | None:
    table = root.table(name, required)
    if table is None:
        return None
    value = read(table)
    table.done()
    return value


def _server(t: _Table) -> ServerConfig:
    return ServerConfig(
        hostname=t.string("hostname", socket.getfqdn()),
        max_message_size=t.integer("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, minimum=1024),
        idle_timeout=t.integer("idle_timeout", 300, minimum=10),
    )


def _tls(t: _Table) -> TLSConfig:
    return TLSConfig(
        certificate=t.path("certificate", None),
        key=t.path("key", None),
        create_self_signed=t.boolean("create_self_signed", False),
    )


def _listener(t: _Table) -> ListenerConfig:
    listener = ListenerConfig(
        name=t.string("name"),
        endpoint=t.string("endpoint"),
        tls=t.string("tls", choices=TLS_MODES),
        auth=t.string("auth", "required", choices=AUTH_MODES),
        min_tls_version=t.string("min_tls_version", "1.2", choices=TLS_VERSIONS),
        allow_plaintext_auth=t.boolean("allow_plaintext_auth", False),
        accept_bare_lf_end=t.boolean("accept_bare_lf_end", False),
    )
    nobody_can_send = listener.auth == "required" and not listener.allow_plaintext_auth
    if listener.tls == "none" and nobody_can_send:
        raise t.error("auth", 'a listener with tls = "none" and auth = "required" accepts '
                              'no one; set allow_plaintext_auth = true or auth = "optional"')
    return listener


def _access(t: _Table) -> AccessConfig:
    return AccessConfig(
        trusted_networks=t.strings("trusted_networks", DEFAULT_TRUSTED_NETWORKS),
        users_file=t.path("users_file", None),
    )


def _upstream(t: _Table) -> UpstreamConfig:
    return UpstreamConfig(
        host=t.string("host"),
        port=t.integer("port", 587, minimum=1, maximum=65535),
        tls=t.string("tls", "starttls", choices=("starttls", "implicit")),
        ca_certificates=t.path("ca_certificates", ""),
        timeout=t.integer("timeout", 60, minimum=1),
    )


def _credentials(t: _Table) -> CredentialsConfig:
    credentials = CredentialsConfig(
        mapper=t.string("mapper", "static", choices=("static",)),
        username=t.string("username", None),
        password=t.secret("password"),
    )
    if credentials.username is None:
        raise t.error("username", "required key is missing")
    if credentials.password is None:
        raise t.error("password_file", "the upstream password is missing: "
                                       "give password_file or password_env")
    return credentials


def _demo(t: _Table) -> DemoConfig:
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
    root = _Table(path, "", data, os.path.dirname(os.path.abspath(path)))

    listeners_data = root._get("listener", list, _REQUIRED)
    listeners = []
    for index, item in enumerate(listeners_data):
        table = _Table(path, f"listener[{index}]", item, root.base_dir)
        listeners.append(_listener(table))
        table.done()
    if not listeners:
        raise ConfigError(path, "listener", "at least one [[listener]] is needed")
    names = [listener.name for listener in listeners]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(path, f"listener[{index}].name", f"duplicate listener name {name!r}")

    config = Config(
        path=path,
        server=_section(root, "server", _server) or ServerConfig(hostname=socket.getfqdn()),
        tls=_section(root, "tls", _tls) or TLSConfig(),
        listeners=tuple(listeners),
        access=_section(root, "access", _access) or AccessConfig(),
        upstream=_section(root, "upstream", _upstream, required=True),
        credentials=_section(root, "credentials", _credentials, required=True),
        demo=_section(root, "demo", _demo),
    )
    root.done()
    _check_whole(config)
    return config


def _check_whole(config: Config) -> None:
    """Rules that span tables."""
    if any(listener.tls != "none" for listener in config.listeners):
        if not config.tls.certificate or not config.tls.key:
            raise ConfigError(config.path, "tls.certificate",
                              "a listener uses TLS, so [tls] certificate and key are required")


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
