"""The bridge's Prometheus metrics, in a registry of its own (several bridges may run in
one process, as in the tests).

Events are counted as they happen (L{IStatistics}: messages, TLS handshakes, AUTH, OAuth
tokens, rate-limit refusals); figures that are state (open sessions, blocked addresses,
the pool and spool) are read in the reactor's thread just before each scrape, through
the functions given to L{Metrics.watch} and L{Metrics.gauge}.  Labels carry names
(listeners, accounts, routes, TLS versions), never a login's secret.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.logger import Logger
from zope.interface import implementer

from smtpbridge.interfaces import IStatistics
from smtpbridge.pool import SessionPool
from smtpbridge.spool import Spool
from smtpbridge.summary import MessageSummary

log = Logger()

#: Seconds spent upstream per message: a login alone takes a few hundred milliseconds.
UPSTREAM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@implementer(IStatistics)
class Metrics:
    """Every metric of the bridge, and the hooks that keep the state figures fresh."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.messages = Counter("smtpbridge_messages", "Messages by listener, account and "
                                "status", ["listener", "account", "status"], registry=registry)
        self.message_bytes = Counter("smtpbridge_message_bytes", "Bytes of the messages by "
                                     "listener, account and status",
                                     ["listener", "account", "status"], registry=registry)
        self.upstream_replies = Counter("smtpbridge_upstream_replies", "The upstreams' "
                                        "verdicts on messages by route and reply code",
                                        ["route", "code"], registry=registry)
        self.upstream_seconds = Histogram("smtpbridge_upstream_seconds", "Seconds a message "
                                          "waited on the upstream (connect, login, commands, "
                                          "the final reply)", ["route"],
                                          buckets=UPSTREAM_BUCKETS, registry=registry)
        self.sessions = Gauge("smtpbridge_sessions_open", "Client sessions open by listener",
                              ["listener"], registry=registry)
        self.tls_handshakes = Counter("smtpbridge_tls_handshakes", "Client TLS handshakes by "
                                      "listener, version and cipher",
                                      ["listener", "version", "cipher"], registry=registry)
        self.auth_attempts = Counter("smtpbridge_auth_attempts", "Client AUTH attempts by "
                                     "listener and result (ok, failed, blocked, busy, rate, "
                                     "error)", ["listener", "result"], registry=registry)
        self.blocked_addresses = Gauge("smtpbridge_auth_blocked_addresses", "Client addresses "
                                       "refused AUTH after repeated failures",
                                       registry=registry)
        self.rate_limit_refusals = Counter("smtpbridge_rate_limited", "MAIL and RCPT commands "
                                    "refused by a rate limit", ["limit"], registry=registry)
        self.token_fetches = Counter("smtpbridge_oauth_token_fetches", "OAuth2 access tokens "
                                     "fetched by account and result (ok, failed)",
                                     ["account", "result"], registry=registry)
        self.upstream_ready = Gauge("smtpbridge_upstream_ready", "1 when the last readiness "
                                    "probe of the route and account passed, else 0",
                                    ["route", "account"], registry=registry)
        self._watchers: list[Callable[[], object]] = []

    # IStatistics: events as they happen.

    def message(self, summary: MessageSummary) -> None:
        outcome = summary.outcome
        labels = (summary.listener, outcome.account or "", summary.status)
        self.messages.labels(*labels).inc()
        self.message_bytes.labels(*labels).inc(summary.size)
        if outcome.relay is not None and outcome.reply is not None:
            self.upstream_replies.labels(outcome.route or "", str(outcome.reply.code)).inc()
        if summary.status in ("sent", "refused", "deferred") and outcome.route is not None:
            self.upstream_seconds.labels(outcome.route).observe(summary.upstream_time)

    def tls(self, listener: str, version: str, cipher: str) -> None:
        self.tls_handshakes.labels(listener, version, cipher).inc()

    def auth(self, listener: str, result: str) -> None:
        self.auth_attempts.labels(listener, result).inc()

    def token(self, account: str, ok: bool) -> None:
        self.token_fetches.labels(account, "ok" if ok else "failed").inc()

    def rate_limited(self, limit: str) -> None:
        self.rate_limit_refusals.labels(limit).inc()

    # State read before each scrape.

    def watch(self, read: Callable[[], object]) -> None:
        """Call C{read} (in the reactor's thread) before each scrape; it sets gauges."""
        self._watchers.append(read)

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str],
              read: Callable[[], Mapping[tuple[str, ...], float]]) -> Gauge:
        """The hook for the pool and the spool: a gauge whose values C{read()} gives before
        each scrape, as {label values: value} (values of labels it no longer gives go)."""
        gauge = Gauge(name, documentation, list(labelnames), registry=self.registry)

        def refresh() -> None:
            if labelnames:
                gauge.clear()
            for labels, value in read().items():
                if labels:
                    gauge.labels(*labels).set(value)
                else:
                    gauge.set(value)

        self.watch(refresh)
        return gauge

    def watch_pool(self, pool: SessionPool) -> None:
        """The figures of the pool of logged-in upstream sessions."""
        self.gauge("smtpbridge_pool_idle_sessions",
                   "Logged-in upstream sessions kept idle for the next message.", (),
                   lambda: {(): float(pool.idle())})
        self.gauge("smtpbridge_pool_sessions_opened",
                   "Upstream sessions opened since the start.", (),
                   lambda: {(): float(pool.opened)})
        self.gauge("smtpbridge_pool_sessions_reused",
                   "Transactions served by a kept upstream session since the start.", (),
                   lambda: {(): float(pool.reused)})

    def watch_spool(self, spool: Spool) -> None:
        """The figures of the spool (this process's, with workers)."""
        self.gauge("smtpbridge_spool_messages", "Messages waiting in the spool.", (),
                   lambda: {(): float(len(spool.ids()))})
        self.gauge("smtpbridge_spool_bytes", "Bytes of the messages in the spool.", (),
                   lambda: {(): float(spool.stored)})

    def refresh(self) -> None:
        """Bring the state figures up to date (before a scrape, in the reactor's thread)."""
        for read in self._watchers:
            try:
                read()
            except Exception:
                log.failure("a metrics source failed")
