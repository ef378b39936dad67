"""A fast SMTP sink for the benchmarks: STARTTLS and AUTH required, messages counted.

It plays the upstream (the provider's port 587) for bench/compare.py and
bench/hostile.py, in its own process so that its CPU is not the bench's.  It
listens on 127.0.0.1, requires STARTTLS before AUTH and AUTH (PLAIN or LOGIN,
one account) before MAIL, accepts every message, counts it and throws it
away.  Several transactions per session (RSET, as Postfix's connection cache
does) and pipelined commands are fine.

    python bench/sink.py --certificate CERT --key KEY --user U --password P

It prints ``port N`` once it listens, then answers each ``count`` line on its
standard input with ``count <messages> <sessions> <refusals>``.  It exits when
its standard input closes, so it never outlives the bench that started it.

With ``--endless-reply`` it is a hostile upstream instead: every connection
gets a ``220-`` greeting that never ends, as fast as the peer reads it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import signal
import ssl
import sys

MAX_LINE = 4096


class Counters:
    def __init__(self) -> None:
        self.messages = 0
        self.sessions = 0
        self.refusals = 0  # refused logins, commands out of order, failed handshakes


class Settings:
    def __init__(self, context: ssl.SSLContext, user: str, password: str,
                 counters: Counters) -> None:
        self.context = context
        self.user = user
        self.password = password
        self.counters = counters


_GREETING = b"220 sink.localhost ESMTP bench sink\r\n"
_EHLO_PLAIN = (b"250-sink.localhost\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
               b"250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")
_EHLO_TLS = (b"250-sink.localhost\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
             b"250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n")
_OK = b"250 2.0.0 Ok\r\n"
_QUEUED = b"250 2.0.0 Ok: queued and discarded\r\n"
_END_OF_DATA = b"\r\n.\r\n"


class SinkSession(asyncio.Protocol):
    """One upstream session: a small SMTP state machine, no body kept."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transport: asyncio.BaseTransport | None = None
        self.buffer = bytearray()
        self.early = b""
        self.tls = False
        self.switching = False
        self.authenticated = False
        self.mail = False
        self.recipients = 0
        self.in_data = False
        self.tail = b""
        self.continuation: str | None = None  # "plain", "login-user", "login-password"
        self.login_user = ""
        self.closed = False

    # Connection events.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.settings.counters.sessions += 1
        self.write(_GREETING)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def refuse(self, reply: bytes) -> None:
        self.settings.counters.refusals += 1
        self.write(reply)

    def data_received(self, data: bytes) -> None:
        if self.switching:
            # Decrypted already, but start_tls() has not handed over the TLS transport yet.
            self.early += data
            return
        self.buffer += data
        while self.buffer and not self.switching and not self.closed:
            if self.in_data:
                if not self._body():
                    return
                continue
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self.write(b"500 5.5.0 Line too long\r\n")
                    self.close()
                return
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[:end + 1]
            self.line(line)

    def _body(self) -> bool:
        """Look for the final dot; True when it was found (and the rest is in the buffer)."""
        window = self.tail + bytes(self.buffer)
        self.buffer.clear()
        end = window.find(_END_OF_DATA)
        if end < 0:
            self.tail = window[-4:]
            return False
        self.buffer += window[end + len(_END_OF_DATA):]
        self.in_data = False
        self.mail, self.recipients = False, 0
        self.settings.counters.messages += 1
        self.write(_QUEUED)
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    # Commands.

    def line(self, line: bytes) -> None:
        if self.continuation is not None:
            self.auth_continue(line.decode("ascii", "replace").strip())
            return
        verb, _, argument = line.decode("utf-8", "replace").partition(" ")
        handler = getattr(self, f"do_{verb.upper()}", None)
        if handler is None:
            self.refuse(b"502 5.5.2 Command not recognized\r\n")
            return
        handler(argument.strip())

    def do_EHLO(self, argument: str) -> None:  # noqa: N802
        self.mail, self.recipients = False, 0
        self.write(_EHLO_TLS if self.tls else _EHLO_PLAIN)

    def do_HELO(self, argument: str) -> None:  # noqa: N802
        self.mail, self.recipients = False, 0
        self.write(b"250 sink.localhost\r\n")

    def do_STARTTLS(self, argument: str) -> None:  # noqa: N802
        if self.tls:
            self.refuse(b"503 5.5.1 TLS already active\r\n")
            return
        # Stop reading before the 220 leaves: the ClientHello must reach the TLS layer.
        # Whatever came after STARTTLS in clear text is thrown away (RFC 3207).
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.switching = True
        self.buffer.clear()
        self.write(b"220 2.0.0 Ready to start TLS\r\n")
        asyncio.get_running_loop().create_task(self._start_tls())

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, self.settings.context,
                                             server_side=True)
        except (OSError, ssl.SSLError, ConnectionError, asyncio.CancelledError):
            self.settings.counters.refusals += 1
            self.closed = True
            self.transport.abort()  # type: ignore[union-attr]
            return
        if transport is None:  # the connection went away meanwhile
            self.closed = True
            return
        self.transport = transport
        self.tls = True
        self.switching = False
        self.mail, self.recipients = False, 0
        early, self.early = self.early, b""
        if early:
            self.data_received(early)

    def do_AUTH(self, argument: str) -> None:  # noqa: N802
        if not self.tls:
            self.refuse(b"538 5.7.11 Encryption required for requested authentication\r\n")
            return
        if self.authenticated:
            self.refuse(b"503 5.5.1 Already authenticated\r\n")
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism == "PLAIN":
            if initial:
                self.check_plain(initial)
            else:
                self.continuation = "plain"
                self.write(b"334 \r\n")
        elif mechanism == "LOGIN":
            if initial:
                self.auth_continue_login_user(initial)
            else:
                self.continuation = "login-user"
                self.write(b"334 VXNlcm5hbWU6\r\n")
        else:
            self.refuse(b"504 5.5.4 Unrecognized authentication type\r\n")

    def auth_continue(self, text: str) -> None:
        step, self.continuation = self.continuation, None
        if text == "*":
            self.refuse(b"501 5.7.0 Authentication cancelled\r\n")
        elif step == "plain":
            self.check_plain(text)
        elif step == "login-user":
            self.auth_continue_login_user(text)
        else:
            self.check(self.login_user, _decode(text))

    def auth_continue_login_user(self, text: str) -> None:
        self.login_user = _decode(text)
        self.continuation = "login-password"
        self.write(b"334 UGFzc3dvcmQ6\r\n")

    def check_plain(self, text: str) -> None:
        parts = _decode(text).split("\0")
        if len(parts) != 3:
            self.refuse(b"501 5.5.2 Malformed AUTH PLAIN response\r\n")
            return
        self.check(parts[1], parts[2])

    def check(self, user: str, password: str) -> None:
        if user == self.settings.user and password == self.settings.password:
            self.authenticated = True
            self.write(b"235 2.7.0 Authentication successful\r\n")
        else:
            self.refuse(b"535 5.7.8 Authentication credentials invalid\r\n")

    def do_MAIL(self, argument: str) -> None:  # noqa: N802
        if not self.authenticated:
            self.refuse(b"530 5.7.0 Authentication required\r\n")
        elif self.mail:
            self.refuse(b"503 5.5.1 Nested MAIL command\r\n")
        else:
            self.mail, self.recipients = True, 0
            self.write(_OK)

    def do_RCPT(self, argument: str) -> None:  # noqa: N802
        if not self.mail:
            self.refuse(b"503 5.5.1 Need MAIL command\r\n")
        else:
            self.recipients += 1
            self.write(_OK)

    def do_DATA(self, argument: str) -> None:  # noqa: N802
        if not self.recipients:
            self.refuse(b"503 5.5.1 Need RCPT command\r\n")
            return
        self.in_data = True
        self.tail = b"\r\n"  # so that an empty body (just ".") ends at once
        self.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def do_RSET(self, argument: str) -> None:  # noqa: N802
        self.mail, self.recipients = False, 0
        self.write(_OK)

    def do_NOOP(self, argument: str) -> None:  # noqa: N802
        self.write(_OK)

    def do_QUIT(self, argument: str) -> None:  # noqa: N802
        self.write(b"221 2.0.0 Bye\r\n")
        self.close()


def _decode(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""


class EndlessReply(asyncio.Protocol):
    """A hostile upstream: a 220- greeting that goes on for ever, as fast as it is read."""

    CHUNK = b"".join(b"220-sink.localhost this greeting never ends %06d\r\n" % i
                     for i in range(1200))

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.transport: asyncio.WriteTransport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.counters.sessions += 1
        self.fill()

    def fill(self) -> None:
        # Write until the transport's buffer is full; resume_writing() comes back for more.
        while not self.paused and self.transport is not None \
                and not self.transport.is_closing():
            self.transport.write(self.CHUNK)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        asyncio.get_running_loop().call_soon(self.fill)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    counters = Counters()
    if args.endless_reply:
        def factory() -> asyncio.Protocol:
            return EndlessReply(counters)
    else:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certificate, args.key)
        settings = Settings(context, args.user, args.password, counters)

        def factory() -> asyncio.Protocol:
            return SinkSession(settings)
    server = await loop.create_server(factory, "127.0.0.1", args.port, backlog=4096,
                                      reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"port {port}\n")
    sys.stdout.flush()
    done = loop.create_future()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, lambda: done.done() or done.set_result(None))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def control() -> None:
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.strip() == b"count":
                sys.stdout.write(f"count {counters.messages} {counters.sessions} "
                                 f"{counters.refusals}\n")
                sys.stdout.flush()
        if not done.done():
            done.set_result(None)

    task = loop.create_task(control())
    await done
    task.cancel()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--certificate", help="PEM certificate chain for STARTTLS")
    parser.add_argument("--key", help="PEM private key")
    parser.add_argument("--user", default="relay@example.com")
    parser.add_argument("--password", default="")
    parser.add_argument("--port", type=int, default=0, help="default 0: the OS picks")
    parser.add_argument("--endless-reply", action="store_true",
                        help="be a hostile upstream whose greeting never ends")
    args = parser.parse_args(argv)
    if not args.endless_reply and not (args.certificate and args.key):
        parser.error("--certificate and --key are required")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
