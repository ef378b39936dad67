"""A fake upstream for tests: L{FakeUpstream} (an L{IUpstreamConnector}) and the
L{FakeUpstreamSession}s it opens, scripted per step, keeping the real session's rules
(the contract tests in ``tests/test_upstream_contract.py`` run against both).
Import it from L{smtpbridge.testing}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from smtpbridge.client import upstream_error
from smtpbridge.connector import SessionSlots
from smtpbridge.errors import LoginRejected, UpstreamError
from smtpbridge.interfaces import IUpstreamConnector, IUpstreamSession, Params
from smtpbridge.model import Reply, Route, UpstreamAccount
from smtpbridge.replies import (
    BYE,
    NEED_MAIL,
    NEED_RCPT,
    NESTED_MAIL,
    OK,
    RECIPIENT_OK,
    SENDER_OK,
    START_DATA,
    UpstreamFailure,
)

QUEUED = Reply(250, "2.0.0", "Ok: queued")

#: What the fake upstream offers after STARTTLS, as the real session reports it.
UPSTREAM_FEATURES = {"SIZE": "33554432", "8BITMIME": "", "SMTPUTF8": "", "AUTH": "PLAIN LOGIN"}


def unreachable(route: Route) -> UpstreamError:
    """The error of a host that refuses the connection, worded as the real connector's."""
    return upstream_error(route, UpstreamFailure.UNREACHABLE, "unreachable: connection refused")


def login_rejected(route: Route, username: str, reply: str = "535 5.7.8 Bad login",
                   ) -> LoginRejected:
    """The error of a host that refuses the login, worded as the real connector's."""
    text = f"rejected the login of {username}: {reply}"
    return LoginRejected(upstream_error(route, UpstreamFailure.SECURITY, text).reply)


@attr.define
class UpstreamMessage:
    """A message body the fake upstream took after a 354, and its verdict at the final dot."""

    sender: str
    recipients: list[str]
    body: bytes = b""  # what write_lines got, each line ended by CRLF (no dot-stuffing)
    reply: Reply | None = None  # the reply to the final dot; None: never finished


#: A command waiting for its reply: its Deferred, its name in the script ("rcpt:<address>"),
#: its step as the real session names it, and the upstream taking it (which gives the reply).
_Command = tuple[Deferred[Reply], str, str, Callable[[], Reply]]


@implementer(IUpstreamSession)
class FakeUpstreamSession:
    """An upstream session in memory, keeping the real session's rules.

    ``replies`` maps a step (``"mail"``, ``"rcpt"`` or ``"rcpt:<address>"``, ``"data"``,
    ``"end_data"``, ``"reset"``) to the upstream's reply instead of its positive one;
    with ``hold_replies`` each reply waits until L{release}; at the step ``fail_at``
    names the connection is lost (L{fail}).  Commands are answered in the order sent,
    and each takes effect (envelope, DATA, the message kept) when it is answered.
    ``commands`` records the command lines (parameters as given: choosing the ones
    the upstream offers is the real client's job), ``transmissions`` every body.
    ``on_end()`` is called once when the session has ended (failed, closed or aborted).
    """

    def __init__(self, route: Route, account: UpstreamAccount | None,
                 features: Mapping[str, str] = UPSTREAM_FEATURES,
                 replies: Mapping[str, Reply] | None = None, fail_at: str | None = None,
                 hold_replies: bool = False, valid_until: float | None = None,
                 on_end: Callable[[], object] | None = None) -> None:
        self.route = route
        self.account = account
        self.valid_until = valid_until
        self.on_end = on_end
        self.features = dict(features)
        self.replies = dict(replies or {})
        self.fail_at = fail_at
        self.hold_replies = hold_replies
        self.commands: list[str] = []
        self.transmissions: list[UpstreamMessage] = []
        self.producer: IPushProducer | None = None  # registered on 354 until the end of data
        self.error: UpstreamError | None = None
        self.in_data = False
        self.aborted = False
        self.closed = False  # quit() was called and has fired
        self._pending: deque[_Command] = deque()
        self._sender: str | None = None  # None: no transaction under way
        self._recipients: list[str] = []

    @property
    def usable(self) -> bool:
        """True while in no failure, not closed, not in DATA and with no command pending."""
        return self.error is None and not self._pending and not self.in_data

    @property
    def messages(self) -> list[UpstreamMessage]:
        """The messages the upstream accepted, oldest first."""
        return [message for message in self.transmissions
                if message.reply is not None and message.reply.positive]

    # Scripting.

    def _reply(self, key: str, default: Reply) -> Reply:
        general = key.partition(":")[0]
        return self.replies.get(key, self.replies.get(general, default))

    def release(self) -> None:
        """Answer the oldest waiting command, or lose the connection if it is at C{fail_at}."""
        deferred, key, _, answer = self._pending[0]
        if self.fail_at in (key, key.partition(":")[0]):
            self.fail()
            return
        self._pending.popleft()
        deferred.callback(answer())

    def release_all(self) -> None:
        """Answer every waiting command, oldest first (and those sent meanwhile)."""
        while self._pending and self.error is None:
            self.release()

    def fail(self, text: str | None = None) -> None:
        """Lose the connection: the pending and every later call fail with the 451 4.4.2
        the real session gives, by default naming the step under way."""
        if self.error is None:
            if text is None:
                step = self._pending[0][2] if self._pending else (
                    "the message body" if self.in_data else "an idle session")
                text = f"closed the connection during {step}"
            self._break(upstream_error(self.route, UpstreamFailure.LOST, text))

    def _break(self, error: UpstreamError) -> None:
        self.error = error
        self.producer = None
        pending, self._pending = self._pending, deque()
        for deferred, *_ in pending:
            deferred.errback(error)
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()

    def _queue(self, key: str, step: str, answer: Callable[[], Reply]) -> Deferred[Reply]:
        deferred: Deferred[Reply] = Deferred()
        self._pending.append((deferred, key, step, answer))
        if not self.hold_replies:
            self.release_all()
        return deferred

    def _send(self, line: str, key: str, step: str, answer: Callable[[], Reply],
              ) -> Deferred[Reply]:
        if self.error is not None:
            return fail(self.error)
        if self._in_data_or_waiting:
            return fail(RuntimeError(f"{step} during DATA"))
        self.commands.append(line)
        return self._queue(key, step, answer)

    # IUpstreamSession.

    def mail(self, sender: str, params: Params) -> Deferred[Reply]:
        def answer() -> Reply:
            if self._sender is not None:
                return NESTED_MAIL
            reply = self._reply("mail", SENDER_OK)
            if reply.positive:
                self._sender, self._recipients = sender, []
            return reply

        words = [f"MAIL FROM:<{sender}>"]
        words.extend(key if value is None else f"{key}={value}" for key, value in params.items())
        return self._send(" ".join(words), "mail", "MAIL", answer)

    def rcpt(self, recipient: str, params: Params) -> Deferred[Reply]:
        def answer() -> Reply:
            if self._sender is None:
                return NEED_MAIL
            reply = self._reply(f"rcpt:{recipient}", RECIPIENT_OK)
            if reply.positive:
                self._recipients.append(recipient)
            return reply

        return self._send(f"RCPT TO:<{recipient}>", f"rcpt:{recipient}", "RCPT", answer)

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        def answer() -> Reply:
            if self._sender is None:
                return NEED_MAIL
            if not self._recipients:
                return NEED_RCPT
            reply = self._reply("data", START_DATA)
            if reply.code == 354:
                self.in_data = True
                self.producer = producer
                self.transmissions.append(UpstreamMessage(self._sender, list(self._recipients)))
            return reply

        return self._send("DATA", "data", "DATA", answer)

    def write_lines(self, lines: Sequence[bytes]) -> None:
        if self.error is not None:
            return
        if not self.in_data:
            raise RuntimeError("write_lines outside DATA")
        self.transmissions[-1].body += b"".join(line + b"\r\n" for line in lines)

    def end_data(self) -> Deferred[Reply]:
        if self.error is not None:
            return fail(self.error)
        if not self.in_data:
            return fail(RuntimeError("end_data outside DATA"))
        self.producer = None
        self.in_data = False
        self.commands.append(".")
        message = self.transmissions[-1]

        def answer() -> Reply:
            message.reply = self._reply("end_data", QUEUED)
            self._sender, self._recipients = None, []
            return message.reply

        return self._queue("end_data", "end of data", answer)

    def reset(self) -> Deferred[Reply]:
        def answer() -> Reply:
            self._sender, self._recipients = None, []
            return self._reply("reset", OK)

        return self._send("RSET", "reset", "RSET", answer)

    @property
    def _in_data_or_waiting(self) -> bool:
        """In DATA, or DATA sent and its reply not yet come: a command would be body text."""
        return self.in_data or any(key == "data" for _, key, _, _ in self._pending)

    def quit(self) -> Deferred[None]:
        if self.error is not None:
            self._close()
            return succeed(None)
        if self._in_data_or_waiting:
            self.abort()
            return succeed(None)
        self.commands.append("QUIT")
        return self._queue("quit", "QUIT", lambda: BYE).addBoth(lambda _: self._close())

    def _close(self) -> None:
        self.closed = True
        self._end("session was closed")

    def abort(self) -> None:
        self.aborted = self.aborted or self.error is None
        self._end("session was aborted")

    def _end(self, text: str) -> None:
        if self.error is None:
            self._break(upstream_error(self.route, UpstreamFailure.LOST, text))


#: A connection under way: its Deferred, route, account, and what to call when it ends.
_Connecting = tuple[Deferred[IUpstreamSession], Route, UpstreamAccount | None,
                    Callable[[], object] | None]


@implementer(IUpstreamConnector)
class FakeUpstream:
    """Opens L{FakeUpstreamSession}s, or fails as scripted per host; records every attempt.

    ``connect_errors`` maps a host to the error its connections fail with (see
    L{unreachable} and L{login_rejected}).  ``replies``, ``fail_at``, ``hold_replies``,
    ``valid_until`` and ``features`` are copied into each session opened afterwards.
    With ``hold_connects`` each connection waits until L{release_connects}.  Like
    L{smtpbridge.connector.UpstreamConnector} it has ``slots`` (on C{clock}) and
    L{open}, which L{smtpbridge.pool.SessionPool} uses.
    """

    def __init__(self, features: Mapping[str, str] = UPSTREAM_FEATURES,
                 clock: IReactorTime | None = None) -> None:
        self.features = dict(features)
        self.replies: dict[str, Reply] = {}
        self.fail_at: str | None = None
        self.hold_replies = False
        self.valid_until: float | None = None
        self.connect_errors: dict[str, UpstreamError] = {}
        self.hold_connects = False
        self.attempts: list[tuple[Route, UpstreamAccount | None]] = []
        self.sessions: list[FakeUpstreamSession] = []
        self.slots = SessionSlots(clock if clock is not None else Clock())
        self._connecting: list[_Connecting] = []

    @property
    def messages(self) -> list[UpstreamMessage]:
        """The messages accepted over all sessions, oldest session first."""
        return [message for session in self.sessions for message in session.messages]

    @property
    def open_sessions(self) -> list[FakeUpstreamSession]:
        """The sessions not ended yet (connected, as the upstream sees it)."""
        return [session for session in self.sessions if session.error is None]

    def connect(self, route: Route, account: UpstreamAccount | None) -> Deferred[IUpstreamSession]:
        return self.open(route, account, None)

    def open(self, route: Route, account: UpstreamAccount | None,
             release: Callable[[], object] | None) -> Deferred[IUpstreamSession]:
        """As L{connect}, in a slot the caller holds: C{release()} is called once the
        session has ended, or could not be opened."""
        self.attempts.append((route, account))
        deferred: Deferred[IUpstreamSession] = Deferred()
        self._connecting.append((deferred, route, account, release))
        if not self.hold_connects:
            self.release_connects()
        return deferred

    def release_connects(self) -> None:
        """Finish every connection waiting now: a session, or the host's scripted error."""
        waiting, self._connecting = self._connecting, []
        for deferred, route, account, release in waiting:
            error = self.connect_errors.get(route.host)
            if error is not None:
                if release is not None:
                    release()
                deferred.errback(error)
                continue
            session = FakeUpstreamSession(route, account, self.features, self.replies,
                                          self.fail_at, self.hold_replies, self.valid_until,
                                          release)
            self.sessions.append(session)
            deferred.callback(session)
