"""The composition root: builds the running bridge from a checked configuration.

This is the only module that imports concrete classes and wires them; every
problem found while wiring (a certificate that does not load, an endpoint
string that does not parse) is a L{ConfigError}.
"""

from __future__ import annotations

import os
import sys

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from smtpbridge import client
from smtpbridge.config import Config, ListenerConfig
from smtpbridge.demo import MailFolderDelivery, demo_upstream_factory
from smtpbridge.errors import ConfigError
from smtpbridge.interfaces import IDelivery, IPasswordChecker
from smtpbridge.mapping import StaticMapper
from smtpbridge.model import Assignment, Route, UpstreamAccount
from smtpbridge.policy import AccessPolicy, TrustedNetworks
from smtpbridge.relay import InlineDelivery
from smtpbridge.server import ListenerSettings, SMTPServerFactory
from smtpbridge.tls import ServerTLS, create_self_signed, server_context
from smtpbridge.users import UsersFileChecker, load_users

log = Logger()


class ListenerService(Service):
    """Listens on one endpoint; a port that cannot be bound stops the start in one line."""

    def __init__(self, name: str, description: str, endpoint: object, factory: object) -> None:
        self.name = name
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        outcome: list = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            message = f"cannot listen on {self.description}: {outcome[0].getErrorMessage()}"
            log.critical("{message}", message=message)
            # twistd has already pointed sys.stderr at the log; the terminal needs it too.
            (sys.__stderr__ or sys.stderr).write(f"smtpbridge: {message}\n")
            raise SystemExit(1)
        if not outcome:
            raise RuntimeError(f"{self.description}: the endpoint did not listen at once")
        self.port = outcome[0]
        address = self.port.getHost()
        log.info("{name} listening on {host}:{port}", name=self.name,
                 host=getattr(address, "host", address), port=getattr(address, "port", ""))

    def startService(self) -> None:  # noqa: N802
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> object:  # noqa: N802
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


def _endpoint_service(reactor: object, config: Config, key: str, name: str,
                      description: str, factory: object) -> ListenerService:
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(config.path, key, f"bad endpoint {description!r}: {e}")
    return ListenerService(name, description, endpoint, factory)


def _server_tls(config: Config, min_version: str) -> ServerTLS:
    return ServerTLS(server_context(config.tls.certificate, config.tls.key, min_version,
                                    config.path))


def _checker(config: Config, reactor: object) -> IPasswordChecker | None:
    if config.access.users_file is None:
        return None
    pool = reactor.getThreadPool()

    def run_blocking(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

    return UsersFileChecker(load_users(config.access.users_file), run_blocking)


def _route(config: Config) -> Route:
    upstream = config.upstream
    ca = upstream.ca_certificates
    if ca is not None and not os.access(ca, os.R_OK):
        reason = "does not exist" if not os.path.exists(ca) else "is not readable"
        raise ConfigError(config.path, "upstream.ca_certificates", f"{ca} {reason}")
    return Route(upstream.host, upstream.port, upstream.tls, ca, float(upstream.timeout))


def upstream_assignments(config: Config) -> list[Assignment]:
    """Every route and account the configuration may use upstream (what C{check} tries)."""
    credentials = config.credentials
    return [Assignment(_route(config), UpstreamAccount(credentials.username,
                                                       credentials.password))]


def _delivery(config: Config, reactor: object) -> IDelivery:
    [assignment] = upstream_assignments(config)
    mapper = StaticMapper(assignment)

    def connect(route: Route, account: UpstreamAccount | None) -> Deferred:
        return client.connect(reactor, route, account, config.server.hostname)

    return InlineDelivery(mapper, connect)


def _listener(config: Config, index: int, listener: ListenerConfig, reactor: object,
              delivery: IDelivery, policy: AccessPolicy,
              checker: IPasswordChecker | None) -> ListenerService:
    settings = ListenerSettings(
        name=listener.name,
        hostname=config.server.hostname,
        tls=listener.tls,
        auth_required=listener.auth == "required",
        allow_plaintext_auth=listener.allow_plaintext_auth,
        accept_bare_lf_end=listener.accept_bare_lf_end,
        max_message_size=config.server.max_message_size,
        idle_timeout=config.server.idle_timeout,
    )
    tls = _server_tls(config, listener.min_tls_version) if listener.tls != "none" else None
    factory = SMTPServerFactory(settings, delivery, policy, checker, reactor, tls)
    if listener.tls == "implicit":
        factory = TLSMemoryBIOFactory(tls, False, factory)
    return _endpoint_service(reactor, config, f"listener[{index}].endpoint",
                             f"listener {listener.name}", listener.endpoint, factory)


def make_service(config: Config, reactor: object) -> MultiService:
    """The whole bridge as one service: every listener, and the demo upstream if configured."""
    top = MultiService()
    policy = AccessPolicy(TrustedNetworks.parse(config.access.trusted_networks, config.path,
                                                "access.trusted_networks"))
    checker = _checker(config, reactor)
    tls = config.tls
    if tls.create_self_signed and not (os.path.exists(tls.certificate)
                                       or os.path.exists(tls.key)):
        create_self_signed(tls.certificate, tls.key, config.server.hostname)
    delivery = _delivery(config, reactor)
    for index, listener in enumerate(config.listeners):
        _listener(config, index, listener, reactor, delivery, policy,
                  checker).setServiceParent(top)
    if config.demo is not None:
        demo = config.demo
        factory = demo_upstream_factory(MailFolderDelivery(demo.mail_dir), demo.username,
                                        demo.password.value, _server_tls(config, "1.2"), reactor)
        _endpoint_service(reactor, config, "demo.endpoint", "demo upstream", demo.endpoint,
                          factory).setServiceParent(top)
    return top
