"""A hostile upstream SMTP server for tests, scripted to misbehave at a chosen step.

It speaks just enough SMTP to take the bridge through a whole session: greeting, EHLO
(STARTTLS, AUTH PLAIN LOGIN, optionally SMTPUTF8), STARTTLS with a certificate from the
test CA of L{tests.upstream}, EHLO again, AUTH (anything is accepted), MAIL, RCPT, DATA,
the body and the final dot.  A L{Script} makes it misbehave where a test wants it to:

- C{silent}: a step it never answers (it keeps reading, so only a timeout helps);
- C{endless}: a step answered by a multi-line reply that never ends;
- C{endless_line}: a step answered by one line that never ends (no CRLF, ever);
- C{refuse_data}: a reply line (such as "554 5.7.1 No") that DATA gets instead of 354;
- C{body}: after 354, C{"stall"} stops reading the socket (its receive buffer is made
  small first, so the bridge's writes block) and keeps the connection open; C{"reset"}
  takes C{reset_after} bytes of the body, then resets the connection (RST).

It runs on 127.0.0.1 (a port the OS picks) in its own threads, one per connection, with
plain sockets and L{ssl}.  It counts connections (the most open at once included) and
records each one: its command lines, how many body bytes came, when and how it ended.
A connection counts as open from its accept until the server saw it end or answered
QUIT.  C{stop()} ends every connection, even one the bridge still holds open; the
C{scripted_upstream} fixture calls it after each test::

    from tests.scripted_upstream import ScriptedUpstream, scripted_upstream

    FIXTURES = (scripted_upstream,)
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, NoReturn

import attr
import pytest

from tests.upstream import write_ca_bundle, write_certificate

HOST = "localhost"  # the name the bridge connects to (and its certificate's)

#: The steps a script may name, in the order of a session.
STEPS = ("greeting", "EHLO", "STARTTLS", "EHLO after TLS", "AUTH", "MAIL", "RCPT", "DATA",
         "end of data", "QUIT")

_TICK = 0.05  # how often a blocked thread looks at the stop flag
_SMALL_BUFFER = 4096  # SO_RCVBUF of a connection that will stall (the kernel doubles it)

Body = Literal["read", "stall", "reset"]


@attr.frozen
class Script:
    """What the upstream does wrong, and where (steps are names of L{STEPS})."""

    silent: str | None = None
    endless: str | None = None
    endless_line: str | None = None
    body: Body = "read"
    reset_after: int = 256 * 1024  # body bytes taken before a "reset"
    smtputf8: bool = False
    refuse_data: str | None = None

    def __attrs_post_init__(self) -> None:
        for step in (self.silent, self.endless, self.endless_line):
            if step is not None and step not in STEPS:
                raise ValueError(f"unknown step {step!r}; one of {STEPS}")


class _Closed(Exception):
    """The connection ended: C{how} says why (see L{Connection.how})."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


@attr.define
class Connection:
    """What one connection did.  C{how} it ended: "eof" (the bridge closed it), "reset"
    (the bridge reset it), "write failed" (gone while being written to), "quit" (QUIT
    answered), "reset by script", or "stopped" (ended by C{stop()})."""

    number: int
    opened: float
    commands: list[bytes] = attr.Factory(list)
    body_bytes: int = 0
    tls: bool = False
    ended: float | None = None
    how: str | None = None

    @property
    def closed_by_bridge(self) -> bool:
        """Ended by the bridge (closed, reset, or gone while written to)."""
        return self.how in ("eof", "reset", "write failed")


class ScriptedUpstream:
    """The server; C{start()} it, then point a bridge at C{HOST}:C{port} trusting
    C{ca_file}.  Its counters and records are guarded by one condition, so tests can
    wait on them with L{wait_for}."""

    host = HOST

    def __init__(self, directory: str, script: Script | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        self.script = script or Script()
        cert, key = write_certificate(directory, [HOST, "127.0.0.1"])
        self.ca_file = write_ca_bundle(os.path.join(directory, "ca.pem"))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_TICK)
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._connections: list[Connection] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.active = 0
        self.max_active = 0

    # Life cycle.

    def start(self) -> ScriptedUpstream:
        thread = threading.Thread(target=self._accept_loop, name="scripted-upstream",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and end every connection; returns once every thread is done."""
        self._stopping.set()
        self._threads[0].join(10)  # the accept loop: no connection threads start after it
        for thread in self._threads[1:]:
            thread.join(10)
        self._listener.close()
        with self._changed:
            sockets = list(self._sockets)
        for sock in sockets:
            sock.close()
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        assert not stuck, f"scripted upstream threads did not stop: {stuck}"

    # What tests look at.

    @property
    def connections(self) -> list[Connection]:
        """Every connection so far (a copy), oldest first."""
        with self._changed:
            return [attr.evolve(c, commands=list(c.commands)) for c in self._connections]

    def wait_for(self, predicate: Callable[[ScriptedUpstream], bool],
                 timeout: float) -> bool:
        """Whether C{predicate(self)} came true within C{timeout} seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def wait_ended(self, number: int, timeout: float) -> Connection:
        """Connection C{number} (1 is the first) once it ended, within C{timeout} seconds;
        an AssertionError if it did not."""
        def ended(server: ScriptedUpstream) -> bool:
            known = server.connections
            return len(known) >= number and known[number - 1].how is not None

        assert self.wait_for(ended, timeout), \
            f"upstream connection {number} still open after {timeout} s: {self.connections}"
        return self.connections[number - 1]

    # The server.

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._changed:
                record = Connection(len(self._connections) + 1, time.monotonic())
                self._connections.append(record)
                self._sockets.append(sock)
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                self._changed.notify_all()
            thread = threading.Thread(target=self._serve, args=(sock, record),
                                      name=f"scripted-upstream-{record.number}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, record: Connection) -> None:
        session = _Session(self, sock, record)
        try:
            session.run()
        except _Closed as e:
            how = e.how
        except OSError:  # ssl.SSLError included
            how = "write failed" if session.writing else "reset"
        except Exception as e:  # a bug of this server: ends the connection, visibly
            how = f"server error: {e!r}"
        self._ended(record, "stopped" if self._stopping.is_set() else how)
        try:
            session.sock.close()
        except OSError:
            pass

    def _ended(self, record: Connection, how: str) -> None:
        with self._changed:
            if record.how is None:
                record.how = how
                record.ended = time.monotonic()
                self.active -= 1
                self._changed.notify_all()

    def _note(self, change: Callable[[], object]) -> None:
        with self._changed:
            change()
            self._changed.notify_all()


class _Session:
    """One connection, run by its own thread."""

    def __init__(self, server: ScriptedUpstream, sock: socket.socket,
                 record: Connection) -> None:
        self.server = server
        self.script = server.script
        self.sock: socket.socket = sock
        self.record = record
        self.buffer = b""
        self.writing = False
        sock.settimeout(_TICK)

    # Input and output that give way to stop().

    def _check_stop(self) -> None:
        """L{_Closed} once C{stop()} was called: every loop here looks often."""
        if self.server._stopping.is_set():
            raise _Closed("stopped")

    def recv(self) -> bytes:
        """The next bytes that come; L{_Closed} when the bridge closed the connection."""
        while True:
            self._check_stop()
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise _Closed("eof")
            return data

    def send(self, data: bytes) -> None:
        """All of C{data}, however long the bridge takes to read it (C{writing} meanwhile,
        so that a failure here counts as "write failed")."""
        self.writing = True
        view = memoryview(data)
        while view:
            self._check_stop()
            try:
                view = view[self.sock.send(view):]
            except TimeoutError:
                continue  # TLS wants the same bytes again: they stay in the view
        self.writing = False

    def line(self) -> bytes:
        """The next line, without its line ending."""
        while b"\n" not in self.buffer:
            self.buffer += self.recv()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r")

    def reply(self, step: str, code: int, lines: list[str]) -> None:
        """Answer C{step} with a reply (or misbehave, if the script says so)."""
        if step == self.script.silent:
            while True:  # read on, answer never
                self.buffer = b""
                self.recv()
        if step == self.script.endless:
            chunk = f"{code}-{'x' * 70}\r\n".encode() * 1000
            while True:
                self.send(chunk)
        if step == self.script.endless_line:
            self.send(f"{code} ".encode())
            chunk = b"x" * 65536
            while True:
                self.send(chunk)
        text = [f"{code}-{line}" for line in lines[:-1]] + [f"{code} {lines[-1]}"]
        self.send("".join(f"{line}\r\n" for line in text).encode())

    def command(self) -> bytes:
        """The next command line, recorded."""
        line = self.line()
        self.server._note(lambda: self.record.commands.append(line))
        return line

    # The SMTP session.

    def run(self) -> NoReturn:
        """The session, until it ends (always by an exception)."""
        if self.script.body == "stall":
            # Before the handshake: the bridge's writes soon find the socket full.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SMALL_BUFFER)
        self.reply("greeting", 220, ["upstream.test ESMTP scripted"])
        tls = False
        while True:
            line = self.command()
            verb = line.split(b" ", 1)[0].upper()
            if verb in (b"EHLO", b"HELO"):
                self.reply("EHLO after TLS" if tls else "EHLO", 250, self._features(tls))
            elif verb == b"STARTTLS" and not tls:
                self.reply("STARTTLS", 220, ["2.0.0 Ready to start TLS"])
                self._start_tls()
                tls = True
            elif verb == b"AUTH":
                self._auth(line)
            elif verb == b"MAIL":
                self.reply("MAIL", 250, ["2.1.0 Ok"])
            elif verb == b"RCPT":
                self.reply("RCPT", 250, ["2.1.5 Ok"])
            elif verb == b"DATA" and self.script.refuse_data is not None:
                code, _, text = self.script.refuse_data.partition(" ")
                self.reply("DATA", int(code), [text])
            elif verb == b"DATA":
                self.reply("DATA", 354, ["End data with <CR><LF>.<CR><LF>"])
                self._body()
                self.reply("end of data", 250, ["2.0.0 Ok: queued"])
            elif verb == b"RSET" or verb == b"NOOP":
                self.reply(verb.decode(), 250, ["2.0.0 Ok"])
            elif verb == b"QUIT":
                # Counted as ended before the 221: the bridge may let go of the
                # session as soon as it reads it.
                self.server._ended(self.record, "quit")
                self.reply("QUIT", 221, ["2.0.0 Bye"])
                raise _Closed("quit")
            else:
                self.reply("unknown", 500, ["5.5.2 Error: command not recognized"])

    def _features(self, tls: bool) -> list[str]:
        """The EHLO reply: STARTTLS before TLS, AUTH after it (as real submission servers)."""
        lines = ["upstream.test", "PIPELINING", "SIZE 52428800", "8BITMIME"]
        if self.script.smtputf8:
            lines.append("SMTPUTF8")
        lines.append("AUTH PLAIN LOGIN" if tls else "STARTTLS")
        return lines

    def _start_tls(self) -> None:
        """The server side of the handshake, with the test CA's certificate."""
        self.buffer = b""  # anything sent ahead in clear text is dropped, as it must be
        self.sock.settimeout(10)
        self.sock = self.server._context.wrap_socket(self.sock, server_side=True)
        self.sock.settimeout(_TICK)
        self.server._note(lambda: setattr(self.record, "tls", True))

    def _auth(self, line: bytes) -> None:
        """AUTH PLAIN or LOGIN, with or without an initial response: any login is good."""
        words = line.split()
        mechanism = words[1].upper() if len(words) > 1 else b""
        if mechanism == b"PLAIN" and len(words) == 2:
            self.reply("AUTH", 334, [""])
            self.command()
        elif mechanism == b"LOGIN":
            if len(words) == 2:
                self.reply("AUTH", 334, ["VXNlcm5hbWU6"])
                self.command()
            self.reply("AUTH", 334, ["UGFzc3dvcmQ6"])
            self.command()
        self.reply("AUTH", 235, ["2.7.0 Authentication successful"])

    def _body(self) -> None:
        """Take the message up to its final dot (or stall, or reset, as scripted)."""
        if self.script.body == "stall":
            self._stall()
        tail = b"\r\n"  # the body starts as if after a line end
        while True:
            data = self.buffer or self.recv()
            self.buffer = b""
            seen = tail + data
            end = seen.find(b"\r\n.\r\n")
            if end >= 0:
                taken = end + 5 - len(tail)
                self.buffer = data[taken:]
                self._count(taken)
                return
            self._count(len(data))
            tail = seen[-4:]
            if self.script.body == "reset" and self.record.body_bytes >= self.script.reset_after:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
                self.sock.close()
                raise _Closed("reset by script")

    def _count(self, size: int) -> None:
        """C{size} more body bytes came."""
        def add() -> None:
            self.record.body_bytes += size
        self.server._note(add)

    def _stall(self) -> None:
        """Read nothing more; wait, without reading, for the bridge to end the connection."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while True:
            self._check_stop()
            for _, events in poller.poll(_TICK * 1000):
                if events & (select.POLLHUP | select.POLLERR):
                    raise _Closed("reset")
                if events & select.POLLRDHUP:
                    raise _Closed("eof")


@pytest.fixture
def scripted_upstream(tmp_path: Any) -> Iterator[Callable[..., ScriptedUpstream]]:
    """Starts scripted upstreams (keywords of L{Script}); each is stopped after the test."""
    started: list[ScriptedUpstream] = []

    def start(**script: Any) -> ScriptedUpstream:
        directory = str(tmp_path / f"scripted-upstream-{len(started)}")
        started.append(ScriptedUpstream(directory, Script(**script)).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()
