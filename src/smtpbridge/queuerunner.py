"""The queue runner: takes messages into the spool and delivers them later.

It is the relay's L{smtpbridge.relay.SafetyNet}: a message is kept once it is durable
(fsynced in a thread, so the reactor does not wait on the disk).  Each message is tried
again on a doubling schedule (C{first_retry}, twice that, ... at most C{max_retry}
apart), with the account it was accepted for, over that account's routes (failover
included), at most C{concurrency} at once per route.  A 5xx, or C{max_age} without
success, sends the envelope sender a delivery status notification (no bounce for a
bounce or the null sender).  A message leaves the spool only after the upstream's 2xx
for each of its recipients.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpbridge import dsn
from smtpbridge.interfaces import IStatistics, IUpstreamConnector, IUpstreamSession, Params
from smtpbridge.limits import FlatRelease
from smtpbridge.model import Assignment, ClientInfo, Envelope, MessageOutcome, UpstreamAccount
from smtpbridge.spool import Spool
from smtpbridge.spooldirs import adopt
from smtpbridge.spoolfile import SpoolWriter
from smtpbridge.spoolsend import Outcome, attempt
from smtpbridge.summary import MessageSummary, log_summary

log = Logger()

#: Seconds after a flush took the requests of queue commands during which a signal that
#: finds none is one of theirs (two commands, two signals, both requests taken at once).
SIGNAL_SETTLE = 2.0


@attr.frozen
class RetrySettings:
    """When spooled messages are tried again, and for how long."""

    first_retry: float = 300.0
    max_retry: float = 3600.0
    max_age: float = 5 * 86400.0
    concurrency: int = 5  # deliveries at once per route

    def delay(self, attempts: int) -> float:
        """Seconds until the next try after C{attempts} tries that failed."""
        return float(min(self.first_retry * 2.0 ** max(0, attempts - 1), self.max_retry))


class QueueRunner(Service):
    """Keeps messages in C{spool} and delivers them through C{connector}.

    C{accounts} maps account names to their routes and account (the configuration's);
    C{run_blocking} runs a blocking call in a thread and fires with its result;
    C{on_flush} is called before a flush tries the messages (it lifts the connector's
    hold on hosts found down); C{adopt}, spool directories no process runs, whose
    messages move into C{spool} when it starts.
    """

    def __init__(self, spool: Spool, connector: IUpstreamConnector,
                 accounts: Mapping[str, Assignment], reactor: Any, settings: RetrySettings,
                 hostname: str, run_blocking: Callable[..., Deferred[Any]],
                 statistics: IStatistics | None = None,
                 on_flush: Callable[[], None] | None = None,
                 adopt: Sequence[str] = ()) -> None:
        self._adopt = list(adopt)
        self._statistics = statistics
        self._on_flush = on_flush
        self.spool = spool
        self._connector = connector
        self._accounts = dict(accounts)
        self._reactor = reactor
        self.settings = settings
        self._hostname = hostname
        self._run_blocking = run_blocking
        self._timers: dict[str, IDelayedCall] = {}
        self._broken: dict[str, int] = {}  # attempts that raised in a row, by message
        self._routes: dict[str, DeferredSemaphore] = {}
        self._release = FlatRelease(reactor)
        self._sessions: set[IUpstreamSession] = set()
        self._busy: set[str] = set()  # messages being tried now
        self._again: set[str] = set()  # ... and asked to be tried again once done
        self._previous_handler: Any = None
        self._requests_taken = float("-inf")  # when a flush last took queue commands' requests
        self._stopping = False

    # The relay's safety net.

    def accepts(self, account: UpstreamAccount | None) -> bool:
        return account is not None and self._accounts.get(account.name) is not None and \
            self._accounts[account.name].account == account

    def full(self) -> bool:
        return self.spool.full()

    def writer(self) -> SpoolWriter:
        return self.spool.writer(self._reactor.seconds())

    def keep(self, writer: SpoolWriter, sender: str, recipients: Sequence[str],
             account: UpstreamAccount, params: Params, client: ClientInfo,
             tried: bool = True, bounce: bool = False) -> Deferred[str]:
        now = self._reactor.seconds()
        first = now + self.settings.delay(1) if tried else now
        envelope = Envelope(
            id=writer.id, sender=sender, recipients=tuple(recipients), account=account.name,
            created=now, size=writer.size, params=tuple(params.items()),
            next_attempt=first, client=client.peer_host, session=client.session_id,
            bounce=bounce, attempts=1 if tried else 0)

        def kept(_: object) -> str:
            if bounce:  # a device's message has its summary line (status=spooled)
                log.info("{session} bounce queued as {id}: <{sender}> to {count} "
                         "recipient(s), {size} bytes, account {account}",
                         session=envelope.session, id=envelope.id, sender=sender,
                         count=len(recipients), size=envelope.size, account=account.name)
            self._schedule(envelope.id, first)
            return envelope.id

        def failed(failure: Failure) -> Failure:
            writer.discard()  # (when the commit never ran: the thread pool was full)
            return failure

        return self._run_blocking(writer.commit, envelope).addCallbacks(kept, failed)

    # Service.

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._stopping = False
        for problem in self.spool.prepare():
            log.error("spool: {problem}", problem=problem)
        for directory in self._adopt:
            moved, problems = adopt(self.spool, directory)
            if moved:
                log.info("spool: {count} message(s) taken over from {directory}",
                         count=moved, directory=directory)
            for problem in problems:
                log.error("spool: not taken over: {problem}", problem=problem)
        now = self._reactor.seconds()
        unreadable: list[str] = []
        for envelope in self.spool.envelopes(unreadable):
            self._schedule(envelope.id, max(now, envelope.next_attempt))
        for problem in unreadable:  # (left where it is, for the administrator)
            log.error("spool: message {problem}", problem=problem)
        self.spool.register(os.getpid())
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(
                signal.SIGUSR1, lambda number, frame: self._reactor.callFromThread(self.flush))

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self._stopping = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for session in list(self._sessions):
            session.abort()  # the message stays in the spool
        self.spool.unregister(os.getpid())
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    # Scheduling.

    def _schedule(self, message_id: str, when: float) -> None:
        if self._stopping:
            return
        timer = self._timers.pop(message_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        delay = max(0.0, when - self._reactor.seconds())
        self._timers[message_id] = self._reactor.callLater(delay, self._attempt, message_id)

    def flush(self) -> None:
        """Try at once the messages ``smtpbridge queue flush`` asked for (all when none
        is named): SIGUSR1.  A signal that finds no request just after one that took
        several is a queue command's whose request that one took: it does nothing."""
        requested = self.spool.take_flush_requests()
        now = self._reactor.seconds()
        if not requested and now - self._requests_taken < SIGNAL_SETTLE:
            return
        if requested:
            self._requests_taken = now
        ids = self.spool.ids() if not requested or "all" in requested else sorted(requested)
        log.info("queue flush: trying {count} message(s) now", count=len(ids))
        if self._on_flush is not None:
            self._on_flush()
        for message_id in ids:
            self._schedule(message_id, now)

    def _attempt(self, message_id: str) -> None:
        self._timers.pop(message_id, None)

        def failed(failure: Failure) -> None:
            log.failure("queue {id}: delivery attempt failed", failure, id=message_id)
            # (A full disk, say.)  Tried again later, on the doubling schedule: an attempt
            # that sent to some recipients but could not note it sends to them again.
            broken = self._broken[message_id] = self._broken.get(message_id, 0) + 1
            if message_id not in self._timers:
                self._schedule(message_id,
                               self._reactor.seconds() + self.settings.delay(broken))

        Deferred.fromCoroutine(self._deliver(message_id)).addCallbacks(
            lambda _: self._broken.pop(message_id, None), failed)

    def _gone(self, message_id: str) -> None:
        """The message left the queue without this runner (``smtpbridge queue delete``):
        the spool no longer counts its bytes."""
        self.spool.gone(message_id)

    # Delivery.

    async def _deliver(self, message_id: str) -> None:
        if self._stopping or self.spool.held(message_id):
            return
        if message_id in self._busy:  # a flush while it is being tried: once more after
            self._again.add(message_id)
            return
        self._busy.add(message_id)
        try:
            await self._deliver_once(message_id)
        finally:
            self._busy.discard(message_id)
            if message_id in self._again:
                self._again.discard(message_id)
                if self.spool.load(message_id) is not None:
                    self._schedule(message_id, self._reactor.seconds())

    async def _deliver_once(self, message_id: str) -> None:
        envelope = self.spool.load(message_id)
        if envelope is None:
            self._gone(message_id)
            return
        assignment = self._accounts.get(envelope.account)
        route = assignment.routes[0].name if assignment is not None else "?"
        limit = self._routes.setdefault(route, DeferredSemaphore(self.settings.concurrency))
        await limit.acquire()
        try:
            with self.spool.locked(message_id) as data:
                envelope = self.spool.load(message_id)
                if envelope is None:
                    self._gone(message_id)
                if self.spool.held(message_id):  # held while it waited for its turn
                    return
                if data is None or envelope is None or self._stopping:
                    if envelope is not None and not self._stopping:
                        self._schedule(message_id, self._reactor.seconds() + 60)
                    return
                await self._try(envelope, data, assignment)
        finally:
            self._release(limit)

    async def _try(self, envelope: Envelope, data: BinaryIO,
                   assignment: Assignment | None) -> None:
        now = self._reactor.seconds()
        if assignment is None:
            outcome = Outcome(list(envelope.recipients),
                              error=f"account {envelope.account} is not configured")
        else:
            start = data.tell()  # where the message begins, after the file's envelope
            tried = await attempt(self._connector, self._reactor, self._sessions, envelope,
                                  data, assignment, lambda: self._stopping)
            if tried is None:
                return  # the runner stopped while it connected: no attempt was made
            outcome = tried
        attempts = envelope.attempts + 1
        if outcome.deferred and now - envelope.created >= self.settings.max_age:
            days = self.settings.max_age / 86400
            outcome.failed += [dsn.Failure(r, "4.4.7", outcome.error or "no delivery")
                               for r in outcome.deferred]
            reason = f"could not be delivered for {days:g} days"
            outcome.deferred = []
        else:
            reason = "the upstream refused it"
        if outcome.failed:
            data.seek(start)
            if not await self._bounce(envelope, outcome.failed, data, reason):
                # The bounce could not be queued: the refused recipients stay in the
                # message, and their bounce is tried again at its next attempt.
                outcome.error = f"{outcome.failed[0].diagnostic}; its bounce could not be queued"
                outcome.deferred += [failure.recipient for failure in outcome.failed]
                outcome.failed = []
        failed = {failure.recipient for failure in outcome.failed}
        delivered = [r for r in envelope.recipients
                     if r not in failed and r not in outcome.deferred]
        self._summarize(envelope, assignment, delivered, outcome, now)
        if not outcome.deferred:
            self.spool.remove(envelope.id)
            log.info("{session} queue {id}: done after {attempts} attempt(s): {delivered} "
                     "delivered, {failed} bounced", session=envelope.session,
                     id=envelope.id, attempts=attempts, delivered=len(delivered),
                     failed=len(outcome.failed))
            return
        later = now + self.settings.delay(attempts)
        updated = attr.evolve(envelope, recipients=tuple(outcome.deferred), attempts=attempts,
                              next_attempt=later, last_error=outcome.error)
        if await self._run_blocking(self.spool.update, updated):  # (its fsyncs)
            log.info("{session} queue {id}: deferred ({error}); next attempt in {delay:g} s",
                     session=envelope.session, id=envelope.id, error=outcome.error,
                     delay=later - now)
            self._schedule(envelope.id, later)

    def _summarize(self, envelope: Envelope, assignment: Assignment | None,
                   delivered: list[str], outcome: Outcome, started: float) -> None:
        """The summary lines of a spooled message: sent for those delivered now, bounced
        for those refused for good (the session id is the device's, from long ago)."""
        route = assignment.routes[0].name if assignment is not None else None
        took = max(0.0, self._reactor.seconds() - started)
        for status, recipients, reply in (
                ("sent", delivered, outcome.reply),
                ("bounced", [f.recipient for f in outcome.failed],
                 outcome.failed[0].reply if outcome.failed else None)):
            if not recipients or reply is None:
                continue
            summary = MessageSummary(
                envelope.session, envelope.client, 0, "spool", None, envelope.sender,
                tuple(recipients), envelope.size, reply,
                MessageOutcome(status, envelope.account, route, outcome.relay, reply,
                               envelope.id), 0.0, took)
            log_summary(summary)
            if self._statistics is not None:
                self._statistics.message(summary)

    async def _bounce(self, envelope: Envelope, failed: list[dsn.Failure], data: BinaryIO,
                      reason: str) -> bool:
        """Tell the envelope sender, through the same account (never for a bounce); False
        when the bounce could not be queued."""
        for failure in failed:
            log.info("{session} queue {id}: <{recipient}> bounced: {text}",
                     session=envelope.session, id=envelope.id, recipient=failure.recipient,
                     text=failure.diagnostic)
        assignment = self._accounts.get(envelope.account)
        if envelope.bounce or not envelope.sender or assignment is None or \
                assignment.account is None:
            return True
        account = assignment.account
        address = account.rewrite_sender or f"MAILER-DAEMON@{self._hostname}"
        lines = dsn.bounce(
            reporting_host=self._hostname, from_address=address, to_address=envelope.sender,
            queue_id=envelope.id, arrival=envelope.created, now=self._reactor.seconds(),
            failures=failed, original_headers=dsn.header_section(
                data.read(dsn.HEADER_LIMIT + 1024).split(b"\r\n")), reason=reason)
        writer = self.writer()
        writer.budgeted = False  # (it lets its message leave the spool)
        writer.write(lines)
        client = ClientInfo(envelope.client, 0, "spool", envelope.session)
        try:
            await self.keep(writer, account.rewrite_sender or "", [envelope.sender], account,
                            {}, client, tried=False, bounce=True)
        except OSError as e:
            log.error("{session} queue {id}: the bounce could not be queued: {error}",
                      session=envelope.session, id=envelope.id, error=e)
            return False
        return True
