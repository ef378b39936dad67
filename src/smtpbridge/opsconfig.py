"""The operations tables of the configuration: ``[log]``, ``[rate_limits]``, ``[admin]``.

How the bridge is run and watched, apart from what it relays; read by
L{smtpbridge.config} like its other tables.
"""

from __future__ import annotations

import attr

from smtpbridge.secret import Secret
from smtpbridge.tomlreader import Table

LOG_FORMATS = ("text", "json")


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
