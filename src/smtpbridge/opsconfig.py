"""The operations tables of the configuration: ``[spool]``, ``[log]``, ``[rate_limits]``,
``[admin]``.

How the bridge is run and watched, apart from what it relays; read by
L{smtpbridge.config} like its other tables.
"""

from __future__ import annotations

import attr

from smtpbridge.secret import Secret
from smtpbridge.tomlreader import Table

LOG_FORMATS = ("text", "json")
SPOOL_MODES = ("fallback", "never", "always")


@attr.frozen
class LogConfig:
    """How the log is written under twistd: text lines or JSON lines."""

    format: str = "text"


@attr.frozen
class RateLimitConfig:
    """Messages a minute and recipients a day, per client address and per account; 0 is
    no limit."""

    client_messages_per_minute: int = 0
    client_recipients_per_day: int = 0
    account_messages_per_minute: int = 0
    account_recipients_per_day: int = 0


@attr.frozen
class AdminConfig:
    """The admin HTTP listener: metrics, health and readiness."""

    endpoint: str
    token: Secret | None = attr.field(default=None, repr=False)  # for all but /healthz
    probe_interval: int = 60  # seconds between two readiness probes of the upstreams


def log_table(t: Table) -> LogConfig:
    return LogConfig(format=t.string("format", "text", choices=LOG_FORMATS))


def rate_limits_table(t: Table) -> RateLimitConfig:
    return RateLimitConfig(**{field.name: t.integer(field.name, 0)
                              for field in attr.fields(RateLimitConfig)})


def admin_table(t: Table) -> AdminConfig:
    return AdminConfig(endpoint=t.string("endpoint"), token=t.secret("token"),
                       probe_interval=t.integer("probe_interval", 60, minimum=1))


@attr.frozen
class SpoolConfig:
    """The durable spool: where, when it is used, how long and how often it retries."""

    directory: str = "/var/lib/smtpbridge/spool"
    mode: str = "fallback"  # fallback | never | always
    max_age: int = 5 * 86400  # seconds before an undeliverable message bounces
    first_retry: int = 300
    max_retry: int = 3600
    max_size: int = 1024 * 1024 * 1024  # bytes the spool may hold
    concurrency: int = 5  # deliveries at once per route
    drain_timeout: int = 30  # seconds open transactions get to finish at a stop


def spool_table(t: Table) -> SpoolConfig:
    spool = SpoolConfig(
        directory=t.path("directory", SpoolConfig.directory),
        mode=t.string("mode", "fallback", choices=SPOOL_MODES),
        max_age=t.integer("max_age", 5 * 86400, minimum=60),
        first_retry=t.integer("first_retry", 300, minimum=1),
        max_retry=t.integer("max_retry", 3600, minimum=1),
        max_size=t.integer("max_size", 1024 * 1024 * 1024, minimum=1024 * 1024),
        concurrency=t.integer("concurrency", 5, minimum=1),
        drain_timeout=t.integer("drain_timeout", 30, minimum=0),
    )
    if spool.max_retry < spool.first_retry:
        raise t.error("max_retry", f"must be at least first_retry ({spool.first_retry})")
    return spool
