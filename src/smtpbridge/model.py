"""Frozen value types passed between the stages of the bridge."""

from __future__ import annotations

import json

import attr

from smtpbridge.secret import Secret

#: TLS versions as the configuration spells them, oldest first.
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
#: The versions the bridge accepts upstream: never below TLS 1.2.
UPSTREAM_TLS_VERSIONS = ("1.2", "1.3")


@attr.frozen
class Reply:
    """One SMTP reply: a code, an optional enhanced status code and its text.

    ``text`` may hold several lines separated by ``\\n``; they are sent as a
    multi-line reply.
    """

    code: int
    enhanced: str | None
    text: str

    @property
    def positive(self) -> bool:
        """True for 2xx and 3xx replies."""
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@attr.frozen
class ClientInfo:
    """What the bridge knows about a downstream client; grows as the session does."""

    peer_host: str
    peer_port: int
    listener: str
    session_id: str
    helo: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    login: str | None = None
    esmtp: bool = True
    certificate: str | None = None  # SHA-256 fingerprint (hex) of the client's TLS certificate
    password: Secret | None = attr.field(default=None, repr=False)  # kept only for passthrough


@attr.frozen
class Route:
    """Where upstream submission goes: one host, its port and TLS mode."""

    host: str
    port: int = 587
    tls: str = "starttls"  # starttls | implicit
    ca_certificates: str | None = None  # PEM bundle; None: the system trust store
    timeout: float = 60.0
    min_tls_version: str = "1.2"  # "1.2" | "1.3"
    pins: tuple[str, ...] = ()  # base64 SHA-256 of accepted public keys (SPKI); empty: any
    max_sessions: int = 20  # sessions open at once to this host
    session_wait: float = 30.0  # seconds to wait for a free session
    data_timeout: float = 180.0  # seconds the body may make no progress
    session_idle: float = 30.0  # seconds a session is kept open unused; 0: never kept
    max_messages: int = 100  # messages one session carries before it is closed
    name: str = "default"  # the route's name in the configuration, for logs and metrics


@attr.frozen
class UpstreamAccount:
    """The upstream login used for a transaction. The password's repr hides it.

    An OAuth2 account's tokens come from the token source the connector holds for its
    C{name}: a value type holds no live objects.
    """

    username: str
    password: Secret | None = attr.field(repr=False)  # None for an OAuth2 account
    name: str = "default"
    rewrite_sender: str | None = None  # the address envelope sender and From: become
    mechanism: str = "auto"  # auto | plain | login | xoauth2 | oauthbearer
    oauth: bool = False  # logs in with an OAuth2 token of the account's token source


@attr.frozen
class Assignment:
    """The answer of a credential mapper: the routes (tried in order until one accepts
    the login) and the account that serve a transaction."""

    routes: tuple[Route, ...]
    account: UpstreamAccount | None


#: How a message ended, as the summary line and the metrics say it: taken upstream,
#: refused for good (5xx), to be tried again by the client (4xx), written to the spool,
#: or returned to its sender by the spool.
STATUSES = ("sent", "refused", "deferred", "spooled", "bounced")


def status_for(reply: Reply) -> str:
    """The status a reply gives a message delivered in-line: sent, deferred or refused."""
    if reply.positive:
        return "sent"
    return "deferred" if reply.transient else "refused"


@attr.frozen
class MessageOutcome:
    """What a delivery says about the message it handled, for the summary line.

    Everything is optional but the status: a delivery reports what it knows (no
    account before the mapper answered, no upstream before one replied).
    """

    status: str  # one of STATUSES
    account: str | None = None  # the account's name, never its login or secret
    route: str | None = None  # the route's name
    relay: str | None = None  # host:port of the upstream that answered
    reply: Reply | None = None  # the upstream's (or the delivery's) verdict
    queue_id: str | None = None  # the upstream's id of the message, when its reply names one
    upstream_time: float | None = None  # seconds spent upstream, when measured apart
    why: Reply | None = None  # spooled: what the upstream said (or why it could not say)


@attr.frozen
class Envelope:
    """A spooled message's envelope and delivery state (never a secret: the account is
    named, its credentials stay in the configuration)."""

    id: str
    sender: str  # as it goes upstream (after a sender rewrite); "" for a bounce
    recipients: tuple[str, ...]  # those still to deliver
    account: str  # the name of the upstream account that delivers it
    created: float
    size: int
    params: tuple[tuple[str, str | None], ...] = ()  # MAIL parameters: SIZE, BODY, SMTPUTF8
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    client: str = ""  # the device's address and session, for the logs and DSNs
    session: str = ""
    bounce: bool = False  # a bounce the bridge made: it never bounces itself

    def to_json(self) -> str:
        data = attr.asdict(self)
        data["recipients"] = list(self.recipients)
        data["params"] = [list(item) for item in self.params]
        return json.dumps(data, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Envelope:
        data = json.loads(text)
        data["recipients"] = tuple(data["recipients"])
        data["params"] = tuple((key, value) for key, value in data.get("params", ()))
        known = {field.name for field in attr.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})
