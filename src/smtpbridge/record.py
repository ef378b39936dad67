"""What an in-line transaction's message came to: the outcome that the summary line
and the metrics read, and the spool that keeps the message when the upstream cannot."""

from __future__ import annotations

import errno
from collections.abc import Sequence

from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpbridge.client import where
from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import IUpstreamSession, Params
from smtpbridge.model import ClientInfo, MessageOutcome, Reply, UpstreamAccount, status_for
from smtpbridge.ratelimit import Quota
from smtpbridge.replies import QUEUE_FAILED, SPOOL_FULL
from smtpbridge.spoolfile import SafetyNet, SpoolWriter
from smtpbridge.summary import queue_id as upstream_queue_id
from smtpbridge.wire import reply_line

log = Logger()


class TransactionRecord:
    """The part of L{smtpbridge.relay.InlineTransaction} that notes how its message
    ended and keeps it in the spool; the relay sets these attributes as it goes."""

    outcome: MessageOutcome | None
    _client: ClientInfo
    _session: IUpstreamSession | None
    _account: UpstreamAccount | None
    _route: str | None
    _quota: Quota | None
    _net: SafetyNet | None
    _always: bool
    _writer: SpoolWriter | None
    _sender: str
    _params: Params
    _why: Reply | None

    def _note(self, reply: Reply, upstream: bool, status: str | None = None,
              queue_id: str | None = None, why: Reply | None = None) -> None:
        """Note how the message (or its transaction) ended; C{upstream}: the reply is the
        upstream's own."""
        session = self._session
        relay = where(session.route) if session is not None and upstream else None
        account = self._account.name if self._account is not None else None
        if queue_id is None and reply.positive and upstream:
            queue_id = upstream_queue_id(reply)
        self.outcome = MessageOutcome(status or status_for(reply), account, self._route,
                                      relay, reply, queue_id, why=why)
        if self._quota is not None:
            self._quota.settle(sent=reply.positive)

    def _verdict(self, result: Reply | Failure, upstream: bool = True) -> Reply | Failure:
        """Note an ending step's reply (or failure), passing it on."""
        if isinstance(result, Reply):
            self._note(result, upstream)
        elif isinstance(result.value, SMTPReplyError):
            self._note(result.value.reply, upstream=False)
        return result

    # The spool.

    async def _keep(self, recipients: Sequence[str], delivered: bool = False) -> Reply:
        """Spool the message for C{recipients}: 250 once it is durable.  C{delivered}:
        the upstream took it for the other recipients, so that a refusal would have it
        sent again: it is kept past the spool's max_size too."""
        writer, net, account = self._writer, self._net, self._account
        assert writer is not None and net is not None and account is not None
        self._writer = None
        writer.budgeted = not delivered
        try:
            queue_id = await net.keep(writer, self._sender, recipients, account, self._params,
                                      self._client, tried=not self._always)
        except OSError as e:
            log.error("{session} the message could not be spooled: {error}{upstream}",
                      session=self._client.session_id, error=e,
                      upstream="" if self._why is None else
                      f" (the upstream: {reply_line(self._why)})")
            refusal = SPOOL_FULL if e.errno in (errno.ENOSPC, errno.EDQUOT) else QUEUE_FAILED
            self._note(refusal, upstream=False)
            return refusal
        reply = Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        self._note(reply, upstream=False, status="spooled", queue_id=queue_id, why=self._why)
        return reply

    def _discard(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.discard()
