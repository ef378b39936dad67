"""The composition root: builds the running bridge from a checked configuration.

This is the only module that imports concrete classes and wires them; every problem found
while wiring (a certificate that does not load, an endpoint string that does not parse, a
mapper that is not installed or refuses its options) is a L{ConfigError}.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import attr
from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString

from smtpbridge.config import DEFAULT, Config, ListenerConfig
from smtpbridge.connector import UpstreamConnector, try_login
from smtpbridge.demo import MailFolderDelivery, demo_upstream_factory
from smtpbridge.errors import ConfigError, OptionError
from smtpbridge.handshake import HandshakeFailures
from smtpbridge.interfaces import (
    IClientLoginMapper,
    ICredentialMapper,
    IPasswordChecker,
    IStatistics,
    ITokenSource,
    IUpstreamConnector,
)
from smtpbridge.limits import BoundedThreadPool, ConnectionGovernor, raise_file_limit
from smtpbridge.listener import (
    BridgeService,
    CertificateReloader,
    ImplicitTLSFactory,
    ListenerService,
    SheddingFactory,
    StopHook,
    adopted_endpoint,
)
from smtpbridge.mapping import (
    UpstreamLoginChecker,
    builtin_mapper_factories,
    find_mapper_factory,
    plugin_mapper_names,
)
from smtpbridge.metrics import Metrics
from smtpbridge.model import Assignment, Route, UpstreamAccount
from smtpbridge.networks import NetworkSet, endpoint_kind
from smtpbridge.oauth import token_keepalive
from smtpbridge.policy import AccessPolicy, SenderRules
from smtpbridge.pool import SessionPool
from smtpbridge.proxyheader import ProxyHeaderFactory
from smtpbridge.queuerunner import QueueRunner, RetrySettings
from smtpbridge.ratelimit import RateLimits, RateLimitSettings
from smtpbridge.relay import InlineDelivery
from smtpbridge.sdnotify import SystemdNotifier
from smtpbridge.server import SMTPServerFactory
from smtpbridge.serverbase import ListenerSettings
from smtpbridge.spool import Spool
from smtpbridge.spooldirs import orphans, unusable, worker_directory
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
    kind = endpoint_kind(description)
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
                       float(route.session_idle), route.max_messages_per_session, name)
                 for host in route.hosts)


def accounts(config: Config) -> dict[str, Assignment]:
    """Every configured account with its routes, by account name."""
    return {name: Assignment(_routes(config, account.route), UpstreamAccount(
                account.username, account.password, name=name,
                rewrite_sender=(account.address or account.username)
                if account.rewrite_sender else None,
                mechanism=account.mechanism, oauth=account.oauth is not None))
            for name, account in config.accounts.items()}


def token_sources(config: Config, reactor: Any,
                  statistics: IStatistics | None = None) -> dict[str, ITokenSource]:
    """The OAuth2 token source of every account that logs in with a token, by name."""
    from smtpbridge.oauth import token_source

    sources: dict[str, ITokenSource] = {}
    for name, account in config.accounts.items():
        if account.oauth is not None:
            try:
                source = token_source(account.oauth, reactor)
            except ValueError as e:
                raise ConfigError(config.path, f"{account.origin}.oauth", str(e))
            if statistics is not None:
                source.observe = functools.partial(statistics.token, name)
            sources[name] = source
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


def upstreams(config: Config, reactor: Any,
              statistics: IStatistics | None = None) -> Upstreams:
    """The connector and the mapper the configuration describes."""
    known = accounts(config)
    connector = UpstreamConnector(reactor, config.server.hostname,
                                  token_sources(config, reactor, statistics))
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
        rate=access.auth_rate, cool_down=access.auth_cool_down))


def _queue_runner(config: Config, reactor: Any, upstream: Upstreams,
                  connector: IUpstreamConnector, parent: MultiService,
                  statistics: IStatistics | None = None,
                  worker: int | None = None, workers: int = 1) -> QueueRunner | None:
    """The spool and its runner, unless every listener's spool mode is "never"; worker
    C{worker} of C{workers} has its own spool in the directory, its share of max_size."""
    settings = config.spool
    if all((listener.spool or settings.mode) == "never" for listener in config.listeners):
        return None
    directory, max_size = settings.directory, settings.max_size
    if worker is not None:
        directory = worker_directory(settings.directory, worker)
        max_size //= workers
    if (problem := unusable(directory)) is not None:
        raise ConfigError(config.path, "spool.directory", problem)
    threads = BoundedThreadPool(reactor, 4, 100_000, "smtpbridge-spool",
                                busy=OSError(errno.EBUSY, "too many spool writes at once"))
    threads.setServiceParent(parent)
    runner = QueueRunner(
        Spool(directory, max_size), connector, upstream.accounts,
        reactor, RetrySettings(first_retry=settings.first_retry, max_retry=settings.max_retry,
                               max_age=settings.max_age, concurrency=settings.concurrency),
        config.server.hostname, threads.run, statistics,
        on_flush=upstream.connector.forget_down,
        adopt=orphans(settings.directory, worker, workers))
    runner.setName("spool")
    if isinstance(statistics, Metrics):
        statistics.watch_spool(runner.spool)
    runner.setServiceParent(parent)
    return runner


def _rate_limits(config: Config, reactor: Any, statistics: IStatistics | None,
                 workers: int = 1) -> RateLimits | None:  # each worker counts its share
    settings = RateLimitSettings(**{key: max(1, limit // workers) if limit else 0 for key,
                                    limit in attr.asdict(config.rate_limits).items()})
    if settings == RateLimitSettings():
        return None
    return RateLimits(reactor, settings,
                      observe=statistics.rate_limited if statistics is not None else None)


def _admin(config: Config, reactor: Any, upstream: Upstreams, metrics: Metrics,
           throttle: AuthThrottle, top: MultiService) -> None:
    """The admin listener and the readiness probe behind it."""
    from smtpbridge.admin import ReadinessProbe, admin_site, probe_targets

    assert config.admin is not None
    metrics.watch(lambda: metrics.blocked_addresses.set(throttle.blocking()))
    probe = ReadinessProbe(config.admin.probe_interval, upstream.connector,
                           probe_targets(upstream.checked()), reactor, metrics)
    probe.setServiceParent(top)
    site = admin_site(metrics, probe, config.admin.token, config.server.workers)
    _endpoint_service(reactor, config, "admin.endpoint", "admin", config.admin.endpoint,
                      site).setServiceParent(top)


def _count_sessions(metrics: Metrics, server: SMTPServerFactory) -> None:
    metrics.sessions.labels(server.settings.name).set(server.open)


def make_service(config: Config, reactor: Any, adopted: Mapping[str, int] | None = None,
                 worker: int | None = None, workers: int | None = None) -> MultiService:
    """The whole bridge as one service: every listener, and the demo upstream if configured.

    A worker process passes C{adopted}, the descriptor of each listener's socket (by
    listener name) that its supervisor holds, its number C{worker} and the supervisor's
    count of C{workers}; the supervisor runs the demo upstream.
    """
    top = BridgeService(reactor, config.spool.drain_timeout)
    tls = config.tls
    if tls.create_self_signed and tls.certificate and tls.key and not (
            os.path.exists(tls.certificate) or os.path.exists(tls.key)):
        create_self_signed(tls.certificate, tls.key, config.server.hostname,
                           tls.self_signed_names)
    metrics = Metrics() if config.admin is not None else None
    upstream = upstreams(config, reactor, metrics)
    token_keepalive({name: account.oauth for name, account in config.accounts.items()
                     if account.oauth is not None},
                    upstream.connector.tokens, reactor).setServiceParent(top)
    pool = SessionPool(upstream.connector, reactor)
    StopHook(pool.stop, reactor).setServiceParent(top)
    if metrics is not None:
        metrics.watch_pool(pool)
    runner = _queue_runner(config, reactor, upstream, pool, top, metrics, worker,
                           workers or config.server.workers)
    limits = _rate_limits(config, reactor, metrics, workers or config.server.workers)
    deliveries = {mode: InlineDelivery(upstream.mapper, pool,
                                       runner if mode != "never" else None, mode == "always",
                                       limits)
                  for mode in ("never", "fallback", "always")}
    policy = _policy(config)
    threads = BoundedThreadPool(reactor, config.access.auth_threads, config.access.auth_queue,
                                "smtpbridge-password-checks")
    threads.setServiceParent(top)
    checker = _checker(config, upstream, threads, pool.fresh, reactor)
    keep_password = IClientLoginMapper.providedBy(upstream.mapper)
    throttle = _throttle(config, reactor)
    soft, _ = raise_file_limit()
    governor = ConnectionGovernor(soft)
    # Failed client handshakes by listener and reason, for the metrics to read.
    handshake_failures = HandshakeFailures()
    if metrics is not None:
        metrics.gauge("smtpbridge_tls_handshake_failures",
                      "Failed TLS handshakes since the start, by listener and reason.",
                      ("listener", "reason"),
                      lambda: {key: float(n) for key, n in handshake_failures.counts.items()})
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
            min_tls_version=listener.min_tls_version,
            auth_required=listener.auth == "required",
            allow_plaintext_auth=listener.allow_plaintext_auth,
            accept_bare_lf_end=listener.accept_bare_lf_end,
            require_helo=listener.require_helo,
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
        delivery = deliveries[listener.spool or config.spool.mode]
        server = SMTPServerFactory(settings, delivery, policy, checker, reactor, listener_tls,
                                   throttle, keep_password, governor,
                                   handshake_failures=handshake_failures, statistics=metrics)
        top.listeners.append(server)
        if metrics is not None:
            metrics.watch(functools.partial(_count_sessions, metrics, server))
        factory: Any = server
        if listener_tls is not None and listener.tls == "implicit":
            factory = ImplicitTLSFactory(listener_tls, False, factory)
        endpoint = listener.endpoint
        if endpoint.startswith("haproxy:"):  # the session starts once the header is read
            endpoint = endpoint.removeprefix("haproxy:")
            factory = ProxyHeaderFactory(factory, reactor, config.server.handshake_timeout)
        elif throttle.settings.cool_down:  # (behind HAProxy, every peer is HAProxy)
            factory = SheddingFactory(factory, throttle.shedding, policy.trusted)
        if adopted is not None:
            if listener.name not in adopted:
                raise ConfigError(config.path, f"listener[{index}]", "added since the bridge "
                                  "started: restart the bridge to open its socket")
            ListenerService(f"listener {listener.name}", listener.endpoint,
                            adopted_endpoint(reactor, adopted[listener.name], endpoint),
                            factory, governor).setServiceParent(top)
            continue
        _endpoint_service(reactor, config, f"listener[{index}].endpoint",
                          f"listener {listener.name}", endpoint,
                          factory, listener.backlog, governor).setServiceParent(top)
    if config.demo is not None and adopted is None:
        demo = config.demo
        factory = demo_upstream_factory(MailFolderDelivery(demo.mail_dir), demo.username,
                                        demo.password.value,
                                        server_tls(_context_builder(config, None)), reactor)
        _endpoint_service(reactor, config, "demo.endpoint", "demo upstream", demo.endpoint,
                          factory).setServiceParent(top)
    if metrics is not None and adopted is None:
        _admin(config, reactor, upstream, metrics, throttle, top)
    reloader = CertificateReloader(reactor, contexts,
                                   also=[upstream.connector.forget_tls, pool.drain])
    reloader.setName("certificates")
    reloader.setServiceParent(top)
    # Last: when it starts, every listener before it listens.
    if adopted is None:  # a worker's supervisor tells systemd
        SystemdNotifier(reactor, os.environ).setServiceParent(top)
    return top
