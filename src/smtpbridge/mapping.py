"""Credential mappers: which upstream route and account serve a transaction.

Built in: ``static`` (one account), ``per-user`` (the local login),
``per-sender`` (the envelope sender: exact address, then ``@domain``, then the
default), ``per-device`` (certificate fingerprint, then network, then
listener, then the default) and ``passthrough`` (the client's own login,
checked upstream at AUTH time).  Others come as Twisted plugins providing
L{ICredentialMapperFactory}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from twisted.internet.defer import Deferred
from twisted.plugin import getPlugins
from zope.interface import implementer

from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import ICredentialMapper, ICredentialMapperFactory, IPasswordChecker
from smtpbridge.model import Assignment, ClientInfo, Reply, Route, UpstreamAccount
from smtpbridge.policy import TrustedNetworks
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
                 networks: Iterable[tuple[str, Assignment]],
                 listeners: Mapping[str, Assignment], default: Assignment | None) -> None:
        self._certificates = {normalize_fingerprint(k): v for k, v in certificates.items()}
        parsed = [(ipaddress.ip_network(n, strict=False), a) for n, a in networks]
        parsed.sort(key=lambda item: -item[0].prefixlen)
        self._networks = [(TrustedNetworks([net]), a) for net, a in parsed]
        self._listeners = dict(listeners)
        self._default = default

    def map(self, client: ClientInfo, sender: str) -> Assignment:
        if client.certificate and client.certificate in self._certificates:
            return self._certificates[client.certificate]
        for network, assignment in self._networks:
            if client.peer_host in network:
                return assignment
        if client.listener in self._listeners:
            return self._listeners[client.listener]
        if self._default is not None:
            return self._default
        raise no_account(f"the device at [{client.peer_host}] on listener {client.listener}")


def normalize_fingerprint(fingerprint: str) -> str:
    """Lower-case hex without colons, as the bridge records client certificates."""
    return fingerprint.replace(":", "").lower()


@implementer(ICredentialMapper)
class PassthroughMapper:
    """The client's own AUTH login is used upstream; it is never stored or logged."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = routes

    def map(self, client: ClientInfo, sender: str) -> Assignment:
        if client.login is None or not isinstance(client.password, Secret):
            raise no_account("clients without AUTH (passthrough uses the client's login)")
        return Assignment(self._routes, UpstreamAccount(client.login, client.password,
                                                        name=f"passthrough:{client.login}"))


@implementer(IPasswordChecker)
class UpstreamLoginChecker:
    """Checks a local login by logging in upstream with it (for passthrough), so a wrong
    password is refused at AUTH time."""

    def __init__(self, login: object, routes: tuple[Route, ...]) -> None:
        self._login = login  # relay.try_login
        self._routes = routes

    def check(self, username: str, password: str) -> Deferred:
        return self._login(self._routes, UpstreamAccount(username, Secret(password)))


def find_mapper_factory(name: str) -> ICredentialMapperFactory | None:
    """The plugin that offers mapper C{name}, searched in every twisted/plugins directory."""
    for factory in getPlugins(ICredentialMapperFactory):
        if getattr(factory, "name", None) == name:
            return factory
    return None


def plugin_mapper_names() -> list[str]:
    return sorted(str(getattr(f, "name", "?")) for f in getPlugins(ICredentialMapperFactory))
