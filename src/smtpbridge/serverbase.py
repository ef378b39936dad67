"""The core of a downstream session: replies in order, input held while one is pending,
commands dispatched, errors counted, deadlines and output back-pressure.

Replies leave in the order the commands came, even when one waits on a Deferred:
input is held until the reply is out (RFC 2920).  A client that does not read its
replies stops being read (its unsent replies stay within the transport's buffer), a
command line must be complete within C{idle_timeout}, and a session ends after
C{max_session_time} whatever it does.  The commands themselves are in
L{smtpbridge.server} (session), L{smtpbridge.serverauth} (AUTH) and
L{smtpbridge.mailcommands} (MAIL, RCPT, DATA).  Every line a session logs goes through
its factory's L{SessionLogger} and begins with the session id.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Protocol

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.deadline import Deadline
from smtpbridge.errors import SMTPReplyError
from smtpbridge.handshake import HandshakeFailures
from smtpbridge.interfaces import (
    IAccessPolicy,
    IDelivery,
    IPasswordChecker,
    IStatistics,
    ITransaction,
)
from smtpbridge.lines import SMTPLineReceiver
from smtpbridge.model import ClientInfo, Reply
from smtpbridge.replies import INTERNAL_ERROR, LINE_TOO_LONG, NEED_HELO, NOT_RECOGNIZED
from smtpbridge.throttle import AuthThrottle
from smtpbridge.tls import ServerTLS
from smtpbridge.wire import format_reply, parse_command

#: What a handler gives: a reply now, a Deferred reply, or None (it answered itself).
Outcome = Reply | Deferred[Reply] | None

#: Holds that wait on the bridge (a reply, the delivery taking the body): the client is
#: not idle then.  A hold for "output" waits on the client reading, and it is.
WAITING_ON_US = frozenset({"reply", "body"})

#: Seconds a closing session gets to send its last reply before it is cut off.
CLOSE_GRACE = 10.0

#: Bytes of gathered replies that go out without waiting for the end of the read.
GATHER_LIMIT = 16 * 1024


@attr.frozen
class ListenerSettings:
    """What one listener promises its clients."""

    name: str
    hostname: str
    tls: str = "none"  # implicit | starttls | none
    min_tls_version: str = "1.2"  # what the handshake diagnosis compares clients with
    auth_required: bool = True
    allow_plaintext_auth: bool = False
    accept_bare_lf_end: bool = False
    require_helo: bool = False  # refuse MAIL and AUTH before HELO/EHLO, as Postfix can
    max_message_size: int = 36_700_160
    idle_timeout: float = 300
    max_recipients: int = 1000
    max_errors: int = 20
    received_header: bool = True
    received_header_login: bool = False
    handshake_timeout: float = 30
    max_session_time: float = 3600
    max_connections: int = 1000
    max_connections_per_client: int = 50
    data_progress: int = 64 * 1024  # DATA bytes that must arrive within idle_timeout


class SessionLogger(Logger):
    """The log of a listener's sessions: one namespace for all their lines, and a label
    in front of each when set (the demo upstream's sessions say "demo upstream", so
    that they cannot be taken for the bridge's own)."""

    def __init__(self, namespace: str = "smtpbridge.server", label: str = "") -> None:
        super().__init__(namespace=namespace)
        self.label = label

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if self.label and format is not None:
            format = f"{self.label} {format}"
        super().emit(level, format, **kwargs)


class SessionServices(Protocol):
    """What a session uses of its listener's factory (read at each use, so a test may
    swap one)."""

    settings: ListenerSettings
    delivery: IDelivery
    policy: IAccessPolicy
    checker: IPasswordChecker | None
    clock: IReactorTime
    tls: ServerTLS | None
    throttle: AuthThrottle | None
    keep_password: bool  # passthrough needs the login's password
    log: SessionLogger
    handshake_failures: HandshakeFailures
    statistics: IStatistics | None  # hears of messages, TLS and AUTH for the metrics

    def opened(self, client: str, session: ServerSession) -> Reply | None:
        """Count a new connection from C{client}; the 421 if it is one too many."""

    def closed(self, client: str, session: ServerSession) -> None:
        """A connection from C{client} ended."""


@implementer(IPushProducer)
class _OutputGate:
    """Registered with the client's transport: while the transport's buffer of unsent
    replies is full, the session stops reading commands."""

    def __init__(self, session: ServerSession) -> None:
        self._session = session

    def pauseProducing(self) -> None:  # noqa: N802
        self._session.hold("output")

    def resumeProducing(self) -> None:  # noqa: N802
        self._session.release("output")

    def stopProducing(self) -> None:  # noqa: N802
        self._session.release("output")


class ServerSession(SMTPLineReceiver):
    """One client session: the reply and dispatch machinery its commands share."""

    MAX_LENGTH = 12288  # room for AUTH responses (RFC 4954); commands are far shorter

    def __init__(self, factory: SessionServices) -> None:
        super().__init__()
        self.services = factory
        self.log = factory.log
        self.settings = settings = factory.settings
        clock = factory.clock
        self.client = ClientInfo("", 0, settings.name, secrets.token_hex(6))
        self._tls_active = settings.tls == "implicit"
        self._continuation: Callable[[str], Outcome] | None = None
        self._last_command = "greeting"  # what the session did last, for its timeout line
        self._helo_skipped = False  # MAIL or AUTH came before HELO/EHLO (noted once)
        self._transaction: ITransaction | None = None
        self._errors = 0
        self._gone = False
        self._closing = False
        self._draining = False  # the bridge is stopping: close once no transaction is open
        self._gate: _OutputGate | None = None
        self.idle = Deadline(clock, settings.idle_timeout, self._idle_timeout)
        self.lifetime = Deadline(clock, settings.max_session_time, self._session_timeout)
        self._cut_off = Deadline(clock, CLOSE_GRACE, self._abort)

    # Replies go out together: those to one read of input (a pipelined group) leave in
    # one write, so in one TLS record; any other reply leaves at once.

    _gathered: list[bytes] | None = None
    _gathered_size = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._gathered is not None:  # (re-entered)
            super().dataReceived(data)
            return
        self._gathered = []
        try:
            super().dataReceived(data)
        finally:
            self.flush_replies()

    def send(self, data: bytes) -> None:
        if self._gathered is None:
            self.connection.write(data)
            return
        self._gathered.append(data)
        self._gathered_size += len(data)
        if self._gathered_size >= GATHER_LIMIT:  # out now, and go on gathering
            self.flush_replies()
            self._gathered = []

    def flush_replies(self) -> None:
        """Send the gathered replies now (before TLS starts or the connection closes)."""
        gathered, self._gathered, self._gathered_size = self._gathered, None, 0
        if gathered and not self._gone:
            self.connection.write(b"".join(gathered))

    def start_session(self) -> None:
        """The connection is up: the deadlines run."""
        self.idle.start()
        self.lifetime.start()
        if not self._tls_active:
            self.watch_output()

    def watch_output(self) -> None:
        """From now on, replies that cannot leave stop the input.  Not during a TLS
        handshake: TLS holds early writes back until it is done, which would stop the
        very input the handshake needs."""
        if self._gate is None and not self._closing:
            self._gate = _OutputGate(self)
            self.connection.registerProducer(self._gate, True)

    def unwatch_output(self) -> None:
        if self._gate is not None:
            self._gate = None
            self.connection.unregisterProducer()
            self.release("output")

    def end_session(self) -> None:
        """The connection is gone: nothing more is sent, no deadline fires, and nothing the
        client sent that the session had not read yet is acted on (a body's text must
        never run as commands; commands queued behind a reply never run for nobody)."""
        self._gone = True
        self.clearLineBuffer()
        for deadline in (self.idle, self.lifetime, self._cut_off):
            deadline.stop()
        self._end_transaction(abort=True)

    def _end_transaction(self, abort: bool, only: ITransaction | None = None) -> None:
        """Forget the current transaction (if it is C{only}, when given), aborting it."""

    # Deadlines, holding input and closing.

    def hold(self, reason: str) -> None:
        super().hold(reason)
        if reason in WAITING_ON_US:
            self.idle.pause()  # waiting on us is not the client being idle

    def release(self, reason: str) -> None:
        super().release(reason)
        if not self._gone and not self._closing and not (self.holds & WAITING_ON_US):
            self.idle.ensure()

    def note(self, format: str, **fields: object) -> None:
        """Log one line about this session at info level, its id in front."""
        self.log.info("{session} " + format, session=self.client.session_id, **fields)

    def before_helo(self, verb: str) -> Reply | None:
        """MAIL or AUTH (C{verb}) before HELO/EHLO: the 503 where the listener has
        C{require_helo}; otherwise None, as Postfix accepts it by default
        (``smtpd_helo_required = no``), and noted once a session."""
        if self.client.helo is not None:
            return None
        if self.settings.require_helo:
            self.note("{verb} refused: no HELO/EHLO yet (require_helo on listener "
                      "{listener})", verb=verb, listener=self.settings.name)
            return NEED_HELO
        if not self._helo_skipped:
            self._helo_skipped = True
            self.note("{verb} without HELO/EHLO: accepted", verb=verb)
        return None

    def phase(self) -> str:
        """What the session was doing: "greeting" before any command, then the last
        command's verb (an AUTH exchange stays "AUTH")."""
        return self._last_command

    def _idle_timeout(self) -> None:
        self.note("idle timeout after {phase}", phase=self.phase())
        self.close(Reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))

    def _session_timeout(self) -> None:
        self.note("session time limit of {seconds:g} s reached",
                  seconds=self.settings.max_session_time)
        self.close(Reply(421, "4.4.2", f"{self.settings.hostname} Error: session too long"))

    def close(self, reply: Reply | None = None) -> None:
        """End the session: a last reply, the transaction aborted, the connection closed.

        A peer that does not read (or never finishes a TLS handshake) would keep a
        closing connection open forever; it is cut off after L{CLOSE_GRACE} seconds.
        The connection is still read meanwhile, its commands ignored: TLS closes only
        once the peer's close_notify has been read.
        """
        if self._gone or self._closing:
            return
        if reply is not None:
            self.send(format_reply(reply))
        self.flush_replies()
        self._closing = True
        self.idle.stop()
        self._end_transaction(abort=True)
        self.unwatch_output()  # a TLS transport closes only without a producer
        self.connection.loseConnection()
        self._cut_off.start()

    def abort(self, why: str) -> None:
        """Drop the connection at once (it could not close cleanly); C{why} is logged."""
        if not self._gone:
            self.note("{why}: connection aborted", why=why)
            self._closing = True
            self._end_transaction(abort=True)
            self.connection.abortConnection()

    def _abort(self) -> None:
        self.abort("did not close in time")

    # Replies.

    def drain(self) -> None:
        """The bridge is stopping: close now if no transaction is open, else once it ends."""
        self._draining = True
        if self._transaction is None and "reply" not in self.holds:
            self.close(self._shutting_down())

    def _shutting_down(self) -> Reply:
        return Reply(421, "4.3.2", f"{self.settings.hostname} Service shutting down; "
                                   "try again later")

    def reply(self, reply: Reply) -> None:
        """Send one reply; too many errors end the session as Postfix does."""
        if self._gone or self._closing:
            return
        self.send(format_reply(reply))
        if self._draining and self._transaction is None and reply.code != 354:
            self.close(self._shutting_down())
            return
        if reply.code >= 400:
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                self.close(Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many "
                                               "errors"))

    def _respond(self, result: Outcome) -> None:
        """Send the reply a handler produced, holding input while it is not ready."""
        if not isinstance(result, Deferred):
            if result is not None:
                self.reply(result)
            return
        done = False

        def send(reply: Reply) -> None:
            nonlocal done
            done = True
            self.reply(reply)
            self.release("reply")

        result.addErrback(self._failure_reply)
        result.addCallback(send)
        if not done:
            self.hold("reply")

    def _failure_reply(self, failure: Failure) -> Reply:
        if isinstance(failure.value, SMTPReplyError):
            return failure.value.reply
        self.log.failure("{session} internal error", failure, session=self.client.session_id)
        return INTERNAL_ERROR

    # Command dispatch.

    def line_received(self, line: bytes) -> None:
        if self._closing or self._gone:
            return
        self.idle.start()  # the next line has idle_timeout to arrive whole
        if self._continuation is not None:
            continuation, self._continuation = self._continuation, None
            self._respond(self._guarded(continuation, line.decode("ascii", "replace")))
            return
        try:
            command = parse_command(line)
        except SMTPReplyError as e:
            self.reply(e.reply)
            return
        handler: Callable[[str], Outcome] | None = getattr(self, f"smtp_{command.verb}", None)
        if handler is None:
            self.reply(NOT_RECOGNIZED)
            return
        self._last_command = command.verb
        self._respond(self._guarded(handler, command.argument))

    def _guarded(self, handler: Callable[[str], Outcome], argument: str) -> Outcome:
        try:
            return handler(argument)
        except SMTPReplyError as e:
            return e.reply
        except Exception:
            return self._failure_reply(Failure())

    def line_too_long(self) -> None:
        if self._closing or self._gone:
            return
        self.idle.start()
        self._continuation = None  # an answer to an AUTH challenge: the 500 ends the exchange
        self.reply(LINE_TOO_LONG)

    def raw_data_received(self, data: bytes) -> None:
        """Raw mode is only used for a message body (L{smtpbridge.mailcommands})."""
