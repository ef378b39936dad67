"""The composition root: builds the running bridge from a checked configuration.

This is the only module that imports concrete classes and wires them; every
problem found while wiring (a certificate that does not load, an endpoint
string that does not parse, a mapper that is not installed or refuses its
options) is a L{ConfigError}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attr
from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.protocols.tls import TLSMemoryBIOFactory

from smtpbridge.config import DEFAULT, Config, ListenerConfig
from smtpbridge.connector import UpstreamConnector
from smtpbridge.demo import MailFolderDelivery, demo_upstream_factory
from smtpbridge.errors import ConfigError, OptionError
from smtpbridge.interfaces import (
    IClientLoginMapper,
    ICredentialMapper,
    IPasswordChecker,
    ITokenSource,
    IUpstreamConnector,
)
from smtpbridge.limits import BoundedThreadPool, ConnectionGovernor, raise_file_limit
from smtpbridge.listener import (
    CertificateReloader,
    ListenerService,
    StopHook,
    adopted_endpoint,
)
from smtpbridge.mapping import (
    UpstreamLoginChecker,
    builtin_mapper_factories,
    find_mapper_factory,
    plugin_mapper_names,
)
from smtpbridge.model import Assignment, Route, UpstreamAccount
from smtpbridge.networks import NetworkSet
from smtpbridge.policy import AccessPolicy, SenderRules
from smtpbridge.pool import SessionPool
from smtpbridge.relay import InlineDelivery, try_login
from smtpbridge.server import SMTPServerFactory
from smtpbridge.serverbase import ListenerSettings
from smtpbridge.throttle import AuthThrottle, ThrottleSettings
from smtpbridge.tls import ServerTLS, create_self_signed, server_context
from smtpbridge.users import UsersFileChecker, VerifiedLogins, load_users


def _endpoint_service(reactor: Any, config: Config, key: str, name: str,
                      description: str, factory: Any, backlog: int | None = None,
                      governor: ConnectionGovernor | None = None) -> ListenerService:
    try:
        endpoint = serverFromString(reactor, _with_backlog(description, backlog))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(config.path, key, f"bad endpoint {description!r}: {e}")
    return ListenerService(name, description, endpoint, factory, governor)


def _with_backlog(description: str, backlog: int | None) -> str:
    """The endpoint with C{backlog} as its listen queue, where its kind has one and the
    string does not set it already."""
    kinds = description.split(":", 2)
    kind = kinds[1] if kinds[0] == "haproxy" and len(kinds) > 1 else kinds[0]
    if backlog is None or kind not in ("tcp", "tcp6", "unix") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def _context_builder(config: Config, listener: ListenerConfig | None,
                     index: int = 0) -> Callable[[], SSL.Context]:
    """Builds the listener's server context from its files (again on each SIGHUP)."""
    certificate, key, key_name = config.tls.certificate, config.tls.key, "tls"
    if listener is not None and listener.certificate is not None:
        certificate, key, key_name = listener.certificate, listener.key, f"listener[{index}]"
    assert certificate is not None and key is not None, "checked by the configuration"

    def build() -> SSL.Context:
        if listener is None:
            return server_context(certificate, key, "1.2", config.path, key_name)
        return server_context(certificate, key, listener.min_tls_version, config.path,
                              key_name, client_certificates=listener.client_certificates,
                              client_ca=listener.client_ca,
                              client_ca_key=f"listener[{index}].client_ca")
    return build


def _routes(config: Config, name: str) -> tuple[Route, ...]:
    """The route C{name}: one L{Route} per host, in failover order."""
    route = config.routes[name]
    ca = route.ca_certificates
    if ca is not None and not os.access(ca, os.R_OK):
        reason = "does not exist" if not os.path.exists(ca) else "is not readable"
        key = "upstream" if name == DEFAULT else f"upstream.{name}"
        raise ConfigError(config.path, f"{key}.ca_certificates", f"{ca} {reason}")
    return tuple(Route(host, route.port, route.tls, ca, float(route.timeout),
                       route.min_tls_version, route.pin_sha256, route.max_sessions,
                       float(route.session_wait), float(route.data_timeout),
                       float(route.session_idle), route.max_messages_per_session)
                 for host in route.hosts)


def accounts(config: Config) -> dict[str, Assignment]:
    """Every configured account with its routes, by account name."""
    return {name: Assignment(_routes(config, account.route), UpstreamAccount(
                account.username, account.password, name=name,
                rewrite_sender=(account.address or account.username)
                if account.rewrite_sender else None,
                mechanism=account.mechanism, oauth=account.oauth is not None))
            for name, account in config.accounts.items()}


def token_sources(config: Config, reactor: Any) -> dict[str, ITokenSource]:
    """The OAuth2 token source of every account that logs in with a token, by name."""
    from smtpbridge.oauth import token_source

    sources: dict[str, ITokenSource] = {}
    for name, account in config.accounts.items():
        if account.oauth is not None:
            try:
                sources[name] = token_source(account.oauth, reactor)
            except ValueError as e:
                raise ConfigError(config.path, f"{account.origin}.oauth", str(e))
    return sources


@attr.frozen
class Upstreams:
    """The upstream side of the bridge: how sessions are opened, and who picks the
    account for each transaction."""

    connector: UpstreamConnector
    mapper: ICredentialMapper
    accounts: dict[str, Assignment]

    def checked(self) -> list[Assignment]:
        """Every route and account the mapper may use upstream (what C{check} tries)."""
        if IClientLoginMapper.providedBy(self.mapper):
            return [Assignment(self.mapper.routes, None)]
        return list(self.accounts.values())


def upstreams(config: Config, reactor: Any) -> Upstreams:
    """The connector and the mapper the configuration describes."""
    known = accounts(config)
    connector = UpstreamConnector(reactor, config.server.hostname,
                                  token_sources(config, reactor))
    credentials = config.credentials
    builtins = builtin_mapper_factories(
        (listener.name for listener in config.listeners),
        {name: _routes(config, name) for name in config.routes})
    factory = find_mapper_factory(credentials.mapper, builtins)
    if factory is None:
        found = ", ".join(plugin_mapper_names()) or "none"
        raise ConfigError(config.path, "credentials.mapper",
                          f"no mapper named {credentials.mapper!r} (plugins found: {found})")
    try:
        mapper = factory.make(dict(credentials.options), known, reactor)
    except OptionError as e:
        raise ConfigError(config.path, f"credentials.{e.key}", e.reason)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(config.path, "credentials.options", f"{credentials.mapper}: {e}")
    if not IClientLoginMapper.providedBy(mapper):
        for account in config.accounts.values():
            if account.password is None and account.oauth is None:
                raise ConfigError(config.path, f"{account.origin}.password_file",
                                  "the upstream password is missing: give password_file or "
                                  "password_env")
    return Upstreams(connector, mapper, known)


def _checker(config: Config, upstream: Upstreams, threads: BoundedThreadPool,
             logins: IUpstreamConnector, clock: Any) -> IPasswordChecker | None:
    mapper = upstream.mapper
    if IClientLoginMapper.providedBy(mapper):
        return UpstreamLoginChecker(try_login(logins), mapper.routes)
    if config.access.users_file is None:
        return None
    ttl = config.access.login_cache_time
    cache = VerifiedLogins(clock, ttl) if ttl > 0 else None
    return UsersFileChecker(load_users(config.access.users_file), threads.run, cache)


def _policy(config: Config) -> AccessPolicy:
    senders = SenderRules(config.senders.users, config.senders.networks)
    return AccessPolicy(NetworkSet(config.access.trusted_networks), senders)


def _throttle(config: Config, reactor: Any) -> AuthThrottle:
    access = config.access
    return AuthThrottle(reactor, ThrottleSettings(
        failure_limit=access.auth_failure_limit, window=access.auth_failure_window,
        block_time=access.auth_block_time, delay_step=access.auth_failure_delay,
        rate=access.auth_rate))


def make_service(config: Config, reactor: Any,
                 adopted: Mapping[str, int] | None = None) -> MultiService:
    """The whole bridge as one service: every listener, and the demo upstream if configured.

    A worker process passes C{adopted}, the descriptor of each listener's socket (by
    listener name) that its supervisor holds; the supervisor runs the demo upstream.
    """
    top = MultiService()
    tls = config.tls
    if tls.create_self_signed and tls.certificate and tls.key and not (
            os.path.exists(tls.certificate) or os.path.exists(tls.key)):
        create_self_signed(tls.certificate, tls.key, config.server.hostname)
    upstream = upstreams(config, reactor)
    pool = SessionPool(upstream.connector, reactor)
    StopHook(pool.stop, reactor).setServiceParent(top)
    delivery = InlineDelivery(upstream.mapper, pool)
    policy = _policy(config)
    threads = BoundedThreadPool(reactor, config.access.auth_threads, config.access.auth_queue,
                                "smtpbridge-password-checks")
    threads.setServiceParent(top)
    checker = _checker(config, upstream, threads, pool.fresh, reactor)
    keep_password = IClientLoginMapper.providedBy(upstream.mapper)
    throttle = _throttle(config, reactor)
    soft, _ = raise_file_limit()
    governor = ConnectionGovernor(soft)
    contexts: list[tuple[ServerTLS, Callable[[], SSL.Context]]] = []

    def server_tls(build: Callable[[], SSL.Context]) -> ServerTLS:
        tls = ServerTLS(build())
        contexts.append((tls, build))
        return tls

    for index, listener in enumerate(config.listeners):
        settings = ListenerSettings(
            name=listener.name,
            hostname=config.server.hostname,
            tls=listener.tls,
            auth_required=listener.auth == "required",
            allow_plaintext_auth=listener.allow_plaintext_auth,
            accept_bare_lf_end=listener.accept_bare_lf_end,
            max_message_size=config.server.max_message_size,
            idle_timeout=config.server.idle_timeout,
            received_header=config.server.received_header,
            received_header_login=config.server.received_header_login,
            handshake_timeout=config.server.handshake_timeout,
            max_session_time=config.server.max_session_time,
            max_connections=listener.max_connections or config.server.max_connections,
            max_connections_per_client=config.server.max_connections_per_client,
        )
        listener_tls = (server_tls(_context_builder(config, listener, index))
                        if listener.tls != "none" else None)
        factory: Any = SMTPServerFactory(settings, delivery, policy, checker, reactor,
                                         listener_tls, throttle, keep_password, governor)
        if listener_tls is not None and listener.tls == "implicit":
            factory = TLSMemoryBIOFactory(listener_tls, False, factory)
        if adopted is not None:
            ListenerService(f"listener {listener.name}", listener.endpoint,
                            adopted_endpoint(reactor, adopted[listener.name], listener.endpoint),
                            factory, governor).setServiceParent(top)
            continue
        _endpoint_service(reactor, config, f"listener[{index}].endpoint",
                          f"listener {listener.name}", listener.endpoint,
                          factory, listener.backlog, governor).setServiceParent(top)
    if config.demo is not None and adopted is None:
        demo = config.demo
        factory = demo_upstream_factory(MailFolderDelivery(demo.mail_dir), demo.username,
                                        demo.password.value,
                                        server_tls(_context_builder(config, None)), reactor)
        _endpoint_service(reactor, config, "demo.endpoint", "demo upstream", demo.endpoint,
                          factory).setServiceParent(top)
    reloader = CertificateReloader(reactor, contexts,
                                   also=[upstream.connector.forget_tls, pool.drain])
    reloader.setName("certificates")
    reloader.setServiceParent(top)
    return top
