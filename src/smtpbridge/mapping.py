"""Credential mappers: which upstream route and account serve a transaction.

Built in: ``static`` (one account), ``per-user`` (the local login),
``per-sender`` (the envelope sender: exact address, then ``@domain``, then the
default), ``per-device`` (certificate fingerprint, then network, then
listener, then the default) and ``passthrough`` (the client's own login,
checked upstream at AUTH time).  Each is an L{ICredentialMapperFactory} that
checks its own options, exactly like a third-party mapper offered as a Twisted
plugin; L{find_mapper_factory} finds either by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.plugin import getPlugins
from zope.interface import implementer

from smtpbridge.errors import ConfigError, OptionError, SMTPReplyError
from smtpbridge.interfaces import (
    IClientLoginMapper,
    ICredentialMapper,
    ICredentialMapperFactory,
    IPasswordChecker,
)
from smtpbridge.model import Assignment, ClientInfo, Reply, Route, UpstreamAccount
from smtpbridge.networks import Network, NetworkTable, parse_network
from smtpbridge.secret import Secret


def no_account(what: str) -> SMTPReplyError:
    """The refusal when no mapping applies: a 5xx that names what was looked up."""
    return SMTPReplyError(Reply(550, "5.7.1", f"No upstream account is configured for {what}"))


@implementer(ICredentialMapper)
class StaticMapper:
    """One route and one account for every transaction."""

    def __init__(self, assignment: Assignment) -> None:
        self._assignment = assignment

    def map(self, client: ClientInfo, sender: str) -> Assignment:
        return self._assignment


@implementer(ICredentialMapper)
class PerUserMapper:
    """The local AUTH login picks the account; clients without AUTH get the default."""

    def __init__(self, users: Mapping[str, Assignment], default: Assignment | None) -> None:
        self._users = dict(users)
        self._default = default

    def map(self, client: ClientInfo, sender: str) -> Assignment:
        if client.login is not None and client.login in self._users:
            return self._users[client.login]
        if self._default is not None:
            return self._default
        raise no_account(f"user {client.login}" if client.login else "clients without AUTH")


@implementer(ICredentialMapper)
class PerSenderMapper:
    """The envelope sender picks the account: exact address, then @domain, then the default.

    Addresses and domains compare without regard to case.
    """

    def __init__(self, senders: Mapping[str, Assignment], default: Assignment | None) -> None:
        self._senders = {key.lower(): value for key, value in senders.items()}
        self._default = default

    def map(self, client: ClientInfo, sender: str) -> Assignment:
        address = sender.lower()
        domain = "@" + address.rpartition("@")[2] if "@" in address else None
        for key in (address, domain):
            if key and key in self._senders:
                return self._senders[key]
        if self._default is not None:
            return self._default
        raise no_account(f"sender <{sender}>")


@implementer(ICredentialMapper)
class PerDeviceMapper:
    """The device picks the account, without any login: first the SHA-256 fingerprint of
    its TLS client certificate, then its network (the most specific that matches), then
    the listener it came in on, then the default."""

    def __init__(self, certificates: Mapping[str, Assignment],
                 networks: Iterable[tuple[Network, Assignment]],
                 listeners: Mapping[str, Assignment], default: Assignment | None) -> None:
        self._certificates = {normalize_fingerprint(k): v for k, v in certificates.items()}
        self._networks = NetworkTable(networks)
        self._listeners = dict(listeners)
        self._default = default

    def map(self, client: ClientInfo, sender: str) -> Assignment:
        if client.certificate and client.certificate in self._certificates:
            return self._certificates[client.certificate]
        assignment = self._networks.lookup(client.peer_host)
        if assignment is not None:
            return assignment
        if client.listener in self._listeners:
            return self._listeners[client.listener]
        if self._default is not None:
            return self._default
        raise no_account(f"the device at [{client.peer_host}] on listener {client.listener}")


def normalize_fingerprint(fingerprint: str) -> str:
    """Lower-case hex without colons, as the bridge records client certificates."""
    return fingerprint.replace(":", "").lower()


@implementer(IClientLoginMapper)
class PassthroughMapper:
    """The client's own AUTH login is used upstream; it is never stored or logged."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes

    def map(self, client: ClientInfo, sender: str) -> Assignment:
        if client.login is None or not isinstance(client.password, Secret):
            raise no_account("clients without AUTH (passthrough uses the client's login)")
        return Assignment(self.routes, UpstreamAccount(client.login, client.password,
                                                       name=f"passthrough:{client.login}"))


@implementer(IPasswordChecker)
class UpstreamLoginChecker:
    """Checks a local login by logging in upstream with it (for passthrough), so a wrong
    password is refused at AUTH time."""

    def __init__(self, login: Callable[[tuple[Route, ...], UpstreamAccount], Deferred[bool]],
                 routes: tuple[Route, ...]) -> None:
        self._login = login  # relay.try_login
        self._routes = routes

    def check(self, username: str, password: str) -> Deferred[bool]:
        # The account the passthrough mapper gives the client's transactions: the session
        # that checked the login is kept for them.
        return self._login(self._routes, UpstreamAccount(username, Secret(password),
                                                         name=f"passthrough:{username}"))


# The mappers by name: the built-in factories, then the plugins.

_FINGERPRINT = re.compile(r"[0-9a-fA-F:]{64,95}")


class _Options:
    """Reads a built-in mapper's options; every key it does not read is an error."""

    def __init__(self, options: Mapping[str, Any], accounts: Mapping[str, Assignment]) -> None:
        self._options = options
        self._accounts = accounts
        self._read: set[str] = set()

    def string(self, key: str, default: str | None) -> str | None:
        self._read.add(key)
        value = self._options.get(key, default)
        if value is not None and not isinstance(value, str):
            raise OptionError(key, "expected a string")
        return value

    def account(self, key: str, default: str | None) -> Assignment | None:
        """The account named by option C{key}, or None when the option is not given."""
        name = self.string(key, default)
        if name is None:
            return None
        return self.named(key, name)

    def named(self, key: str, name: str) -> Assignment:
        if name not in self._accounts:
            known = ", ".join(self._accounts) or "none"
            raise OptionError(key, f"no account named {name!r} (accounts: {known})")
        return self._accounts[name]

    def table(self, check: Callable[[str, str], None]) -> list[tuple[str, Assignment]]:
        """The entries of ``map`` and ``map_file`` (key -> account), in the order written;
        C{check(option_key, key)} refuses a key the mapper cannot use."""
        self._read.update(("map", "map_file"))
        entries: list[tuple[str, str, str]] = []
        table = self._options.get("map", {})
        if not isinstance(table, dict):
            raise OptionError("map", "expected a table")
        for key, name in table.items():
            if not isinstance(name, str):
                raise OptionError(f"map.{key}", "expected an account name")
            entries.append((f"map.{key}", key, name))
        path = self._options.get("map_file")
        if path is not None:
            entries += [(f"map_file: {key}", key, name) for key, name in _read_map_file(path)]
        result = []
        for option, key, name in entries:
            check(option, key)
            result.append((key, self.named(option, name)))
        return result

    def done(self) -> None:
        for key in self._options:
            if key not in self._read:
                raise OptionError(key, "unknown key")


def _read_map_file(path: str) -> list[tuple[str, str]]:
    """A map file: one "key account" pair per line; blank lines and # comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError("map_file", f"cannot read {path}: "
                                      f"{getattr(e, 'strerror', None) or 'not UTF-8 text'}")
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


def _any_key(option: str, key: str) -> None:
    """Every key is usable (a local user name)."""


def _sender_key(option: str, key: str) -> None:
    local, at, domain = key.rpartition("@")
    if not (at and domain and " " not in key):
        raise OptionError(option, "per-sender keys are addresses or @domain")


@implementer(ICredentialMapperFactory)
class StaticMapperFactory:
    name = "static"

    def make(self, options: Mapping[str, Any], accounts: Mapping[str, Assignment],
             reactor: Any) -> ICredentialMapper:
        read = _Options(options, accounts)
        if not accounts:
            raise OptionError("username", "required key is missing")
        assignment = read.account("account", "default")
        read.done()
        assert assignment is not None
        return StaticMapper(assignment)


@implementer(ICredentialMapperFactory)
class PerUserMapperFactory:
    name = "per-user"

    def make(self, options: Mapping[str, Any], accounts: Mapping[str, Assignment],
             reactor: Any) -> ICredentialMapper:
        read = _Options(options, accounts)
        mapper = PerUserMapper(dict(read.table(_any_key)), read.account("default", None))
        read.done()
        return mapper


@implementer(ICredentialMapperFactory)
class PerSenderMapperFactory:
    name = "per-sender"

    def make(self, options: Mapping[str, Any], accounts: Mapping[str, Assignment],
             reactor: Any) -> ICredentialMapper:
        read = _Options(options, accounts)
        mapper = PerSenderMapper(dict(read.table(_sender_key)), read.account("default", None))
        read.done()
        return mapper


@implementer(ICredentialMapperFactory)
class PerDeviceMapperFactory:
    """Map keys ``certificate:SHA256``, ``network:CIDR`` and ``listener:NAME``; the
    listener names are known to the factory, so a mistyped one is refused."""

    name = "per-device"

    def __init__(self, listeners: Iterable[str] = ()) -> None:
        self.listeners = frozenset(listeners)

    def _check(self, option: str, key: str) -> None:
        kind, _, value = key.partition(":")
        if kind == "listener":
            if self.listeners and value not in self.listeners:
                raise OptionError(option, f"no listener named {value!r}")
        elif kind == "network":
            try:
                parse_network(value)
            except ValueError as e:
                raise OptionError(option, str(e))
        elif kind == "certificate":
            if not _FINGERPRINT.fullmatch(value) or len(value.replace(":", "")) != 64:
                raise OptionError(option, "expected the SHA-256 fingerprint of a client "
                                          "certificate (64 hex digits)")
        else:
            raise OptionError(option, "per-device keys are listener:NAME, network:CIDR or "
                                      "certificate:SHA256")

    def make(self, options: Mapping[str, Any], accounts: Mapping[str, Assignment],
             reactor: Any) -> ICredentialMapper:
        read = _Options(options, accounts)
        table = read.table(self._check)

        def select(prefix: str) -> list[tuple[str, Assignment]]:
            return [(key[len(prefix):], a) for key, a in table if key.startswith(prefix)]

        mapper = PerDeviceMapper(
            dict(select("certificate:")),
            [(parse_network(key), a) for key, a in select("network:")],
            dict(select("listener:")), read.account("default", None))
        read.done()
        return mapper


@implementer(ICredentialMapperFactory)
class PassthroughMapperFactory:
    """The client's own login on the route named by ``route`` (default: "default")."""

    name = "passthrough"

    def __init__(self, routes: Mapping[str, tuple[Route, ...]] | None = None) -> None:
        self.routes = dict(routes or {})

    def make(self, options: Mapping[str, Any], accounts: Mapping[str, Assignment],
             reactor: Any) -> ICredentialMapper:
        read = _Options(options, accounts)
        name = read.string("route", "default")
        read.done()
        if name not in self.routes:
            raise OptionError("route", f"no route named {name!r}")
        return PassthroughMapper(self.routes[name])


def builtin_mapper_factories(listeners: Iterable[str] = (),
                             routes: Mapping[str, tuple[Route, ...]] | None = None,
                             ) -> list[ICredentialMapperFactory]:
    """The built-in mappers, knowing the configured listener names and routes."""
    return [StaticMapperFactory(), PerUserMapperFactory(), PerSenderMapperFactory(),
            PerDeviceMapperFactory(listeners), PassthroughMapperFactory(routes)]


def find_mapper_factory(name: str, builtins: Iterable[ICredentialMapperFactory] = (),
                        ) -> ICredentialMapperFactory | None:
    """The mapper called C{name}: one of C{builtins}, else the plugin that offers it, searched
    in every twisted/plugins directory; None when there is none."""
    for factory in (*builtins, *getPlugins(ICredentialMapperFactory)):
        if getattr(factory, "name", None) == name:
            return factory
    return None


def plugin_mapper_names() -> list[str]:
    """The names of the mappers offered as plugins."""
    return sorted(str(getattr(f, "name", "?")) for f in getPlugins(ICredentialMapperFactory))
