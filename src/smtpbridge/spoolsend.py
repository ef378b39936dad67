"""One delivery attempt of a spooled message: the SMTP conversation with the upstream
over the account's routes, and what came of it for each recipient (L{Outcome})."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

import attr

from smtpbridge import dsn
from smtpbridge.bodypump import BodyPump
from smtpbridge.client import where
from smtpbridge.connector import connect_first
from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import IUpstreamConnector, IUpstreamSession
from smtpbridge.model import Assignment, Envelope, Reply
from smtpbridge.wire import reply_line


@attr.define
class Outcome:
    """What one delivery attempt achieved."""

    deferred: list[str] = attr.Factory(list)  # recipients to try again
    failed: list[dsn.Failure] = attr.Factory(list)  # recipients refused for good
    error: str = ""  # the last temporary failure
    reply: Reply | None = None  # the upstream's reply to the final dot
    relay: str | None = None  # host:port of the upstream that answered

    def add(self, other: Outcome) -> None:
        """What C{other} says of more recipients, added to this."""
        self.deferred += other.deferred
        self.failed += other.failed
        self.error = other.error or self.error


async def attempt(connector: IUpstreamConnector, reactor: Any,
                  sessions: set[IUpstreamSession], envelope: Envelope, data: BinaryIO,
                  assignment: Assignment, stopping: Callable[[], bool]) -> Outcome | None:
    """One attempt over the account's routes: who got it, who waits, who never will.
    The session is in C{sessions} while it is open (to be aborted at a stop); None when
    the runner was C{stopping} by the time it connected (nothing was sent)."""
    recipients = list(envelope.recipients)
    try:
        session = await connect_first(connector, assignment.routes, assignment.account)
    except SMTPReplyError as e:
        return Outcome(recipients, error=reply_line(e.reply))
    if stopping():  # (its stop aborted the sessions it knew: not this one)
        session.quit()
        return None
    sessions.add(session)
    try:
        outcome = await _transaction(session, reactor, envelope, data, recipients)
        outcome.relay = where(session.route)
        return outcome
    except SMTPReplyError as e:  # the session was lost
        return Outcome(recipients, error=reply_line(e.reply))
    finally:
        sessions.discard(session)
        session.quit()

async def _transaction(session: IUpstreamSession, reactor: Any, envelope: Envelope,
                       data: BinaryIO, recipients: list[str]) -> Outcome:
    params = dict(envelope.params)
    if "SMTPUTF8" in params and "SMTPUTF8" not in session.features and (
            not envelope.sender.isascii() or not all(r.isascii() for r in recipients)):
        text = "the upstream does not support SMTPUTF8"
        return Outcome(failed=[dsn.Failure(r, "5.6.7", text) for r in recipients])
    reply = await session.mail(envelope.sender, params)
    if not reply.positive:
        return outcome_of(reply, recipients)
    outcome, accepted = Outcome(), []
    for recipient in recipients:
        reply = await session.rcpt(recipient, {})
        if reply.positive:
            accepted.append(recipient)
        else:
            outcome.add(outcome_of(reply, [recipient]))
    if not accepted:
        return outcome
    pump = BodyPump(data, session, reactor)
    reply = await session.data(pump)
    if reply.code == 354:
        await pump.run()
        reply = outcome.reply = await session.end_data()
    outcome.add(outcome_of(reply, accepted))
    return outcome


def outcome_of(reply: Reply, recipients: list[str]) -> Outcome:
    """What a reply to MAIL, RCPT or the final dot means for C{recipients}."""
    if reply.positive:
        return Outcome()
    if reply.transient:
        return Outcome(list(recipients), error=reply_line(reply))
    status = reply.enhanced or "5.0.0"
    return Outcome(failed=[dsn.Failure(r, status, reply_line(reply), reply)
                            for r in recipients])
