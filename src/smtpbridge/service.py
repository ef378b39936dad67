"""The composition root: builds the running bridge from a checked configuration.

This is the only module that imports concrete classes and wires them; every
problem found while wiring (a certificate that does not load, an endpoint
string that does not parse, a mapper plugin that is not installed) is a
L{ConfigError}.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.tls import TLSMemoryBIOFactory

from smtpbridge import client
from smtpbridge.config import DEFAULT, Config, ListenerConfig
from smtpbridge.demo import MailFolderDelivery, demo_upstream_factory
from smtpbridge.errors import ConfigError
from smtpbridge.interfaces import ICredentialMapper, IPasswordChecker
from smtpbridge.listener import CertificateReloader, ListenerService
from smtpbridge.mapping import (
    PassthroughMapper,
    PerDeviceMapper,
    PerSenderMapper,
    PerUserMapper,
    StaticMapper,
    UpstreamLoginChecker,
    find_mapper_factory,
    plugin_mapper_names,
)
from smtpbridge.model import Assignment, Route, UpstreamAccount
from smtpbridge.policy import AccessPolicy, SenderRules, TrustedNetworks
from smtpbridge.relay import Connector, InlineDelivery, try_login
from smtpbridge.server import ListenerSettings, SMTPServerFactory
from smtpbridge.throttle import AuthThrottle, ThrottleSettings
from smtpbridge.tls import ServerTLS, create_self_signed, server_context
from smtpbridge.users import UsersFileChecker, load_users


def _endpoint_service(reactor: object, config: Config, key: str, name: str,
                      description: str, factory: object) -> ListenerService:
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(config.path, key, f"bad endpoint {description!r}: {e}")
    return ListenerService(name, description, endpoint, factory)


def _context_builder(config: Config, listener: ListenerConfig | None,
                     index: int = 0) -> Callable[[], SSL.Context]:
    """Builds the listener's server context from its files (again on each SIGHUP)."""
    if listener is not None and listener.certificate is not None:
        files, key_name = (listener.certificate, listener.key), f"listener[{index}]"
    else:
        files, key_name = (config.tls.certificate, config.tls.key), "tls"

    def build() -> SSL.Context:
        if listener is None:
            return server_context(*files, "1.2", config.path, key_name)
        return server_context(*files, listener.min_tls_version, config.path, key_name,
                              client_certificates=listener.client_certificates,
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
                       route.min_tls_version, route.pin_sha256)
                 for host in route.hosts)


def accounts(config: Config, reactor: object = None) -> dict[str, Assignment]:
    """Every configured account with its routes, by account name.  OAuth2 accounts get
    their token source (with C{reactor}; without one, none is made)."""
    result = {}
    for name, account in config.accounts.items():
        tokens = None
        if account.oauth is not None and reactor is not None:
            from smtpbridge.oauth import token_source

            try:
                tokens = token_source(account.oauth, reactor)
            except ValueError as e:
                raise ConfigError(config.path, f"{account.origin}.oauth", str(e))
        result[name] = Assignment(_routes(config, account.route), UpstreamAccount(
            account.username, account.password, name=name,
            rewrite_sender=(account.address or account.username)
            if account.rewrite_sender else None,
            token_source=tokens, mechanism=account.mechanism))
    return result


def upstream_assignments(config: Config, reactor: object = None) -> list[Assignment]:
    """Every route and account the configuration may use upstream (what C{check} tries)."""
    if config.credentials.mapper == "passthrough":
        return [Assignment(_routes(config, config.credentials.route), None)]
    return list(accounts(config, reactor).values())


def _mapper(config: Config, reactor: object) -> ICredentialMapper:
    credentials = config.credentials
    known = accounts(config, reactor)
    default = known[credentials.default] if credentials.default is not None else None
    table = [(key, known[name]) for key, name in credentials.map]
    kind = credentials.mapper
    if kind == "static":
        return StaticMapper(known[credentials.account])
    if kind == "per-user":
        return PerUserMapper(dict(table), default)
    if kind == "per-sender":
        return PerSenderMapper(dict(table), default)
    if kind == "per-device":
        def select(prefix: str) -> list[tuple[str, Assignment]]:
            return [(key[len(prefix):], a) for key, a in table if key.startswith(prefix)]
        return PerDeviceMapper(dict(select("certificate:")), select("network:"),
                               dict(select("listener:")), default)
    if kind == "passthrough":
        return PassthroughMapper(_routes(config, credentials.route))
    factory = find_mapper_factory(kind)
    if factory is None:
        found = ", ".join(plugin_mapper_names()) or "none"
        raise ConfigError(config.path, "credentials.mapper",
                          f"no mapper named {kind!r} (plugins found: {found})")
    try:
        return factory.make(dict(credentials.options), known, reactor)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(config.path, "credentials.options", f"{kind}: {e}")


def _connector(config: Config, reactor: object) -> Connector:
    def connect(route: Route, account: UpstreamAccount | None) -> Deferred:
        return client.connect(reactor, route, account, config.server.hostname)
    return connect


def _checker(config: Config, reactor: object) -> IPasswordChecker | None:
    if config.credentials.mapper == "passthrough":
        return UpstreamLoginChecker(try_login(_connector(config, reactor)),
                                    _routes(config, config.credentials.route))
    if config.access.users_file is None:
        return None
    pool = reactor.getThreadPool()

    def run_blocking(f: Callable, *args: object) -> Deferred:
        return deferToThreadPool(reactor, pool, f, *args)

    return UsersFileChecker(load_users(config.access.users_file), run_blocking)


def _policy(config: Config) -> AccessPolicy:
    trusted = TrustedNetworks.parse(config.access.trusted_networks, config.path,
                                    "access.trusted_networks")
    return AccessPolicy(trusted, SenderRules(config.senders.users, config.senders.networks))


def _throttle(config: Config, reactor: object) -> AuthThrottle:
    access = config.access
    return AuthThrottle(reactor, ThrottleSettings(
        failure_limit=access.auth_failure_limit, window=access.auth_failure_window,
        block_time=access.auth_block_time, delay_step=access.auth_failure_delay))


def make_service(config: Config, reactor: object) -> MultiService:
    """The whole bridge as one service: every listener, and the demo upstream if configured."""
    top = MultiService()
    tls = config.tls
    if tls.create_self_signed and not (os.path.exists(tls.certificate)
                                       or os.path.exists(tls.key)):
        create_self_signed(tls.certificate, tls.key, config.server.hostname)
    delivery = InlineDelivery(_mapper(config, reactor), _connector(config, reactor))
    policy = _policy(config)
    checker = _checker(config, reactor)
    throttle = _throttle(config, reactor)
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
        )
        listener_tls = (server_tls(_context_builder(config, listener, index))
                        if listener.tls != "none" else None)
        factory = SMTPServerFactory(settings, delivery, policy, checker, reactor, listener_tls,
                                    throttle, config.credentials.mapper == "passthrough")
        if listener.tls == "implicit":
            factory = TLSMemoryBIOFactory(listener_tls, False, factory)
        _endpoint_service(reactor, config, f"listener[{index}].endpoint",
                          f"listener {listener.name}", listener.endpoint,
                          factory).setServiceParent(top)
    if config.demo is not None:
        demo = config.demo
        factory = demo_upstream_factory(MailFolderDelivery(demo.mail_dir), demo.username,
                                        demo.password.value,
                                        server_tls(_context_builder(config, None)), reactor)
        _endpoint_service(reactor, config, "demo.endpoint", "demo upstream", demo.endpoint,
                          factory).setServiceParent(top)
    reloader = CertificateReloader(reactor, contexts)
    reloader.setName("certificates")
    reloader.setServiceParent(top)
    return top
