"""The upstream SMTP session the delivery drives: L{UpstreamSession}, an
L{IUpstreamSession} over a set-up L{UpstreamProtocol}.  Replies to MAIL, RCPT, DATA and
the final dot are returned as they are, to be passed on verbatim; a failure of the
session fails every call with its L{smtpbridge.errors.UpstreamError}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from smtpbridge.client import UpstreamProtocol, where
from smtpbridge.deadline import Deadline
from smtpbridge.interfaces import IUpstreamSession
from smtpbridge.model import Reply
from smtpbridge.replies import UpstreamFailure
from smtpbridge.wire import END_OF_DATA, encode_lines, reply_line

log = Logger()


@implementer(IPushProducer)
class _StallWatch:
    """The client's body producer as the upstream transport sees it.  While the upstream
    takes no more of the body (its transport paused the producer) for the route's
    C{data_timeout}, the session fails, so neither side waits forever (Postfix's
    smtp_data_xfer_timeout)."""

    def __init__(self, producer: IPushProducer, protocol: UpstreamProtocol) -> None:
        self._producer = producer
        self._deadline = Deadline(protocol.clock, protocol.route.data_timeout,
                                  lambda: protocol.fail(protocol.error_for(
                                      UpstreamFailure.LOST, "took none of the message body "
                                      f"for {protocol.route.data_timeout:g} s")))

    def pauseProducing(self) -> None:  # noqa: N802
        self._deadline.start()
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self._deadline.pause()  # (it starts again at the next pause, on the same timer)
        self._producer.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        self._deadline.stop()
        self._producer.stopProducing()

    def stop(self) -> None:
        """No longer registered: the upstream's pace no longer matters."""
        self._deadline.stop()


@implementer(IUpstreamSession)
class UpstreamSession:
    """One upstream SMTP session: connected, TLS verified, authenticated, ready for MAIL."""

    def __init__(self, protocol: UpstreamProtocol, features: dict[str, str],
                 valid_until: float | None = None) -> None:
        self._protocol = protocol
        self.route = protocol.route
        self.features = features
        self.valid_until = valid_until

    @property
    def usable(self) -> bool:
        """Connected and no command pending."""
        return self._protocol.idle

    def mail(self, sender: str, params: Mapping[str, str | None]) -> Deferred[Reply]:
        """MAIL FROM, passing on only the parameters the upstream advertised."""
        words = [f"MAIL FROM:<{sender}>"]
        for key, value in params.items():
            key = key.upper()
            if key == "SIZE" and value and "SIZE" in self.features:
                words.append(f"SIZE={value}")
            elif key == "BODY" and (value or "").upper() == "8BITMIME" \
                    and "8BITMIME" in self.features:
                words.append("BODY=8BITMIME")
            elif key == "SMTPUTF8" and "SMTPUTF8" in self.features:
                words.append("SMTPUTF8")
        return self._command(" ".join(words), "MAIL")

    def rcpt(self, recipient: str, params: Mapping[str, str | None]) -> Deferred[Reply]:
        """RCPT TO; no parameter is passed on (the bridge offers no RCPT extension)."""
        return self._command(f"RCPT TO:<{recipient}>", "RCPT")

    def _command(self, line: str, step: str) -> Deferred[Reply]:
        """Send a command, unless the session failed or is in DATA (where the line would
        become part of the message)."""
        protocol = self._protocol
        if protocol.error is not None:
            return fail(protocol.error)
        if protocol.in_data or self._data_pending:
            return fail(RuntimeError(f"{step} during DATA"))
        return protocol.send(line, step)

    _data_pending = False  # DATA was sent, its reply has not come
    _watch: _StallWatch | None = None  # the body producer, while registered

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        """DATA: fires with the upstream's 354 (the upstream's write buffer then pauses
        C{producer}), or its refusal."""
        protocol = self._protocol

        def answered(reply: Reply) -> Reply:
            self._data_pending = False
            if reply.code != 354 and reply.code < 400:
                # A 2xx (or another 3xx) to DATA: the upstream is out of step with the
                # dialogue.  No reply of it can stand for the message; the session is
                # broken, like one that was lost.
                error = protocol.error_for(UpstreamFailure.PROTOCOL,
                                           f"answered DATA with {reply_line(reply)}")
                protocol.fail(error)
                raise error
            protocol.in_data = reply.code == 354
            if protocol.in_data and protocol.error is None:
                self._watch = _StallWatch(producer, protocol)
                protocol.connection.registerProducer(self._watch, True)
            return reply

        sent = self._command("DATA", "DATA")
        if not sent.called:
            self._data_pending = True
        return sent.addCallback(answered)

    def _unregister_producer(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()
        if self._protocol.error is None and self._protocol.transport is not None:
            self._protocol.connection.unregisterProducer()

    def write_lines(self, lines: Sequence[bytes]) -> None:
        """Body lines, unstuffed and without line endings; sent dot-stuffed with CRLF."""
        protocol = self._protocol
        if protocol.error is None:
            if not protocol.in_data:
                raise RuntimeError("write_lines outside DATA")
            protocol.connection.write(encode_lines(lines))

    def end_data(self) -> Deferred[Reply]:
        """The final dot: fires with the upstream's verdict on the message."""
        protocol = self._protocol
        if protocol.error is not None:
            return fail(protocol.error)
        if not protocol.in_data:
            return fail(RuntimeError("end_data outside DATA"))
        self._unregister_producer()
        protocol.in_data = False
        protocol.connection.write(END_OF_DATA)
        return protocol.expect("end of data")

    def reset(self) -> Deferred[Reply]:
        """RSET."""
        return self._command("RSET", "RSET")

    def quit(self) -> Deferred[None]:
        """QUIT, then close; never fails.  In DATA (or waiting for its 354) the session is
        aborted instead: a QUIT there would be a line of the message."""
        protocol = self._protocol
        if protocol.error is not None:
            return succeed(None)
        if protocol.in_data or self._data_pending:
            self.abort()
            return succeed(None)
        protocol.quiet = True
        closed = protocol.error_for(UpstreamFailure.LOST, "session was closed")
        return protocol.send("QUIT", "QUIT").addBoth(
            lambda _: protocol.fail(closed, close="lose"))

    def abort(self) -> None:
        """Drop the connection at once, so the upstream never sees a final dot."""
        protocol = self._protocol
        if protocol.error is None:
            if protocol.in_data:
                self._unregister_producer()
            log.info("upstream {where}: transaction aborted", where=where(self.route))
            protocol.quiet = True
            protocol.fail(protocol.error_for(UpstreamFailure.LOST, "session was aborted"))
