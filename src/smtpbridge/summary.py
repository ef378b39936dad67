"""The summary line: one log line per message, as Postfix's ``status=sent`` line.

It answers "did the scanner's mail go out, and if not, why?": the session and the
client, the envelope, the account, route and upstream, the upstream's verdict and queue
id, the delays and the status.  Every field is also a key of the log event, so the JSON
log carries them one by one.  Nothing secret is in it: logins and account names, never a
password or token.
"""

from __future__ import annotations

import re

import attr
from twisted.logger import Logger

from smtpbridge.model import MessageOutcome, Reply

#: The namespace of summary events, for observers that pick them out.
NAMESPACE = "smtpbridge.summary"

log = Logger(namespace=NAMESPACE)

#: How upstreams name the message they took: Postfix and most ("queued as ID"), the
#: demo upstream ("stored as ID"), Exim ("id=ID"), Microsoft 365 ("<ID@host>"), Gmail
#: ("OK 1700000000 ID - gsmtp").
_QUEUE_IDS = (
    re.compile(r"\b(?:queued|stored) as ([\w.@<>-]+)", re.IGNORECASE),
    re.compile(r"\bid=([\w.-]+)"),
    re.compile(r"<([^<>\s]+@[^<>\s]+)>"),
    re.compile(r"\bOK\s+\d+\s+(\S+)\s+-\s+gsmtp", re.IGNORECASE),
)

FORMAT = ("{session} status={status} from=<{sender}> to={to} nrcpt={nrcpt} size={size}"
          "{relayed_text} "
          "client=[{client}]:{client_port} listener={listener} login={login_text} "
          "account={account_text} route={route_text} relay={relay_text} "
          "queue_id={queue_id_text} delay={delay:.2f} delays={client_time:.2f}/"
          "{upstream_time:.2f} ({reply})")


def queue_id(reply: Reply) -> str | None:
    """The id the upstream gave the message in its reply, if it names one."""
    for pattern in _QUEUE_IDS:
        found = pattern.search(reply.text)
        if found:
            return found.group(1).strip("<>")
    return None


@attr.frozen
class MessageSummary:
    """Everything the summary line says about one message (plain values only)."""

    session: str
    client: str  # the client's address (the real one behind a PROXY header)
    client_port: int
    listener: str
    login: str | None
    sender: str
    recipients: tuple[str, ...]  # those accepted
    size: int  # bytes of the body as received
    reply: Reply  # what the client was answered
    outcome: MessageOutcome
    client_time: float  # seconds waiting for the client, from MAIL to the reply
    upstream_time: float  # seconds waiting for the delivery's replies
    relayed_size: int | None = None  # bytes sent on, when folding or bare LFs changed them

    @property
    def status(self) -> str:
        return self.outcome.status


def log_summary(summary: MessageSummary, logger: Logger | None = None) -> None:
    """Log the summary line of one message, on C{logger} (the session's) if given."""
    outcome, reply = summary.outcome, summary.reply
    upstream_reply = outcome.reply or reply
    (logger or log).info(
        FORMAT,
        session=summary.session, status=summary.status, sender=summary.sender,
        recipients=list(summary.recipients),
        to=",".join(f"<{r}>" for r in summary.recipients) or "-",
        nrcpt=len(summary.recipients), size=summary.size, client=summary.client,
        relayed_size=summary.relayed_size,
        relayed_text="" if summary.relayed_size is None else
        f" relayed={summary.relayed_size}",
        client_port=summary.client_port, listener=summary.listener, login=summary.login,
        login_text=summary.login or "-", account=outcome.account,
        account_text=outcome.account or "-", route=outcome.route,
        route_text=outcome.route or "-", relay=outcome.relay,
        relay_text=outcome.relay or "-", code=upstream_reply.code,
        dsn=upstream_reply.enhanced, queue_id=outcome.queue_id,
        queue_id_text=outcome.queue_id or "-",
        delay=summary.client_time + summary.upstream_time,
        client_time=summary.client_time, upstream_time=summary.upstream_time,
        why=None if outcome.why is None else _reply_text(outcome.why),
        reply=_reply_text(reply) + ("" if outcome.why is None else
                                    f"; upstream: {_reply_text(outcome.why)}"),
    )


def _reply_text(reply: Reply) -> str:
    """The reply on one line: code, enhanced code, its lines joined."""
    enhanced = f"{reply.enhanced} " if reply.enhanced else ""
    return f"{reply.code} {enhanced}{' / '.join(reply.text.splitlines())}"
