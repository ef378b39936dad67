"""A hostile upstream, end to end: devices (smtplib, raw sockets) -> the bridge -> an
upstream scripted to misbehave (L{tests.scripted_upstream}).

Whatever the upstream does (replies that never end, silence, a body it stops taking, a
reset in the middle of DATA), the device gets a 4xx naming the upstream within a bounded
time, the bridge lets go of the upstream connection, and it never opens more upstream
sessions per host than C{max_sessions}.  Devices use the "legacy" listener from a
trusted network (127.0.0.0/8), so they need no AUTH and the bridge opens the upstream
session at MAIL FROM.
"""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attr
import pytest

from tests.conftest import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    RunningBridge,
    front_toml,
    start_bridge,
    stop_bridge,
)
from tests.scripted_upstream import ScriptedUpstream, scripted_upstream

FIXTURES = (scripted_upstream,)  # pytest finds fixtures by module attribute

SENDER = "scanner@example.com"
RECIPIENT = "office@example.com"
MESSAGE = b"Subject: scan\r\n\r\nhello\r\n"

Upstreams = Callable[..., ScriptedUpstream]
Bridges = Callable[..., RunningBridge]


# The bridge in front of a scripted upstream.

@pytest.fixture
def bridge_to(reactor: Any, certificate: tuple[str, str], users_file: str,
              tmp_path: Any) -> Iterator[Bridges]:
    """Starts bridges relaying to a L{ScriptedUpstream}: C{route} keys (timeout,
    data_timeout, session_wait, max_sessions) go into its [upstream] table.  The
    defaults are small, so that no test can wait long."""
    running: list[RunningBridge] = []

    def start(upstream: ScriptedUpstream, **route: int) -> RunningBridge:
        directory = tmp_path / f"bridge-{len(running)}"
        directory.mkdir()
        password_file = directory / "upstream-password"
        password_file.write_text(UPSTREAM_PASSWORD + "\n", encoding="utf-8")
        keys = {"timeout": 3, "data_timeout": 1, "session_wait": 1} | route
        table = "".join(f"{key} = {value}\n" for key, value in keys.items())
        toml = front_toml(certificate, users_file) + f"""
[upstream]
host = "{upstream.host}"
port = {upstream.port}
ca_certificates = "{upstream.ca_file}"
{table}
[credentials]
username = "{UPSTREAM_USER}"
password_file = "{password_file}"
"""
        running.append(start_bridge(reactor, toml, str(directory)))
        return running[-1]

    yield start
    for bridge in running:
        stop_bridge(reactor, bridge)


# Devices.

def device(bridge: RunningBridge, timeout: float = 20) -> smtplib.SMTP:
    """smtplib on the legacy listener, past EHLO (a trusted network: no AUTH)."""
    client = smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=timeout)
    code, _ = client.ehlo("device.example")
    assert code == 250
    return client


def timed(call: Callable[[], tuple[int, bytes]]) -> tuple[int, str, float]:
    """A command's reply code, its text and how many seconds it took."""
    started = time.monotonic()
    code, text = call()
    return code, text.decode("utf-8", "replace"), time.monotonic() - started


def upstream_named(upstream: ScriptedUpstream) -> str:
    """How the bridge's replies name the upstream."""
    return f"Upstream {upstream.host}:{upstream.port} "


def big_body(size: int) -> bytes:
    """A message of C{size} bytes or a little more, in short CRLF lines."""
    line = b"y" * 78 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line) + 1)


@attr.define
class Outcome:
    """How a device's message ended: the reply to the final dot, or the error it got
    (the bridge closed the connection), and when, counted from the start."""

    reply: tuple[int, str] | None = None
    error: BaseException | None = None
    seconds: float | None = None


def send_in_thread(bridge: RunningBridge, body: bytes) -> tuple[threading.Thread, Outcome]:
    """MAIL, RCPT, DATA and C{body} from a device in a thread of its own, so the test can
    give up on it; the L{Outcome} is filled in when it ends."""
    outcome = Outcome()
    started = time.monotonic()

    def run() -> None:
        try:
            with device(bridge) as client:
                assert client.mail(SENDER)[0] == 250
                assert client.rcpt(RECIPIENT)[0] == 250
                code, text = client.data(body)
                outcome.reply = (code, text.decode("utf-8", "replace"))
        except (smtplib.SMTPException, OSError) as e:
            outcome.error = e
        outcome.seconds = time.monotonic() - started

    thread = threading.Thread(target=run, name="device", daemon=True)
    thread.start()
    return thread, outcome


def held_by_bridge(port: int) -> int:
    """How many connections to local port C{port} the kernel still holds open on the
    accepting side (established, or closed by the peer but not yet by us): the bridge's
    client connections, seen from outside the bridge."""
    held = 0
    with open("/proc/net/tcp", encoding="ascii") as f:
        for row in f.readlines()[1:]:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] in ("01", "08"):  # ESTABLISHED, CLOSE_WAIT
                held += 1
    return held


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether C{condition()} came true within C{timeout} seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# Replies that never end: capped, so the bridge's memory cannot grow with them.

@pytest.mark.parametrize("step, during", [("greeting", "greeting"),
                                          ("EHLO after TLS", "EHLO")])
def test_endless_reply_is_cut_off(scripted_upstream: Upstreams, bridge_to: Bridges,
                                  step: str, during: str) -> None:
    """A reply of 220- (before TLS) or 250- (after it) lines that never ends: the bridge
    stops at 100 lines and drops the connection, long before the step's timeout."""
    upstream = scripted_upstream(endless=step)
    bridge = bridge_to(upstream, timeout=5)
    with device(bridge) as client:
        code, text, seconds = timed(lambda: client.mail(SENDER))
    assert code == 451, text
    assert text.startswith("4.4.2 " + upstream_named(upstream)), text
    assert f"sent a reply of more than 100 lines or 64 KiB during {during}" in text, text
    assert seconds < 2.5, f"the cap took {seconds:.1f} s; the step timeout is 5 s"
    connection = upstream.wait_ended(1, timeout=2)
    assert connection.closed_by_bridge, connection
    assert connection.tls == (step == "EHLO after TLS")


@pytest.mark.parametrize("step, during", [("greeting", "greeting"),
                                          ("EHLO after TLS", "EHLO")])
def test_endless_line_is_cut_off(scripted_upstream: Upstreams, bridge_to: Bridges,
                                 step: str, during: str) -> None:
    """A reply line that never ends (no CRLF, ever): 451 4.5.0 for an over-long line, as
    soon as the line is over-long, and the connection dropped."""
    upstream = scripted_upstream(endless_line=step)
    bridge = bridge_to(upstream, timeout=5)
    with device(bridge) as client:
        code, text, seconds = timed(lambda: client.mail(SENDER))
    assert code == 451, text
    assert text.startswith("4.5.0 " + upstream_named(upstream)), text
    assert f"sent an over-long line during {during}" in text, text
    assert seconds < 2.5, f"took {seconds:.1f} s; the step timeout is 5 s"
    connection = upstream.wait_ended(1, timeout=2)
    assert connection.closed_by_bridge, connection


# Silence.

def test_silent_upstream_greeting(scripted_upstream: Upstreams, bridge_to: Bridges) -> None:
    """No greeting at all: 451 4.4.2 after the route's timeout, the connection dropped."""
    upstream = scripted_upstream(silent="greeting")
    bridge = bridge_to(upstream, timeout=2)
    with device(bridge) as client:
        code, text, seconds = timed(lambda: client.mail(SENDER))
    assert (code, text) == (451, "4.4.2 " + upstream_named(upstream)
                            + "timed out during greeting")
    assert 1.5 < seconds < 5
    assert upstream.wait_ended(1, timeout=2).closed_by_bridge


def test_silent_upstream_mail(scripted_upstream: Upstreams, bridge_to: Bridges) -> None:
    """No reply to MAIL: 451 4.4.2 "timed out during MAIL" after the route's timeout."""
    upstream = scripted_upstream(silent="MAIL")
    bridge = bridge_to(upstream, timeout=2)
    with device(bridge) as client:
        code, text, seconds = timed(lambda: client.mail(SENDER))
        assert (code, text) == (451, "4.4.2 " + upstream_named(upstream)
                                + "timed out during MAIL")
        assert 1.5 < seconds < 5
        connection = upstream.wait_ended(1, timeout=2)
        assert connection.closed_by_bridge, connection
        assert connection.commands[-1] == f"MAIL FROM:<{SENDER}>".encode()
        # The device's session goes on: a new transaction opens a new upstream session.
        assert client.rset()[0] == 250


@pytest.mark.parametrize("step", ["DATA", "end of data"])
def test_silent_upstream_data_or_end_of_data(scripted_upstream: Upstreams,
                                             bridge_to: Bridges, step: str) -> None:
    """No answer to DATA (the device sends its body to the bridge's own 354 meanwhile),
    or no verdict on the message: the final dot gets 451 4.4.2 after the route's
    timeout, and only in the second case did the body go upstream."""
    upstream = scripted_upstream(silent=step)
    bridge = bridge_to(upstream, timeout=2)
    with device(bridge) as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        code, text, seconds = timed(lambda: client.data(MESSAGE))
    assert (code, text) == (451, "4.4.2 " + upstream_named(upstream)
                            + f"timed out during {step}")
    assert 1.5 < seconds < 5
    connection = upstream.wait_ended(1, timeout=2)
    assert connection.closed_by_bridge, connection
    if step == "DATA":
        assert connection.body_bytes == 0
    else:
        assert connection.body_bytes > len(MESSAGE)  # the whole message and the final dot


def send_past_data(client: smtplib.SMTP) -> tuple[int, str]:
    """MAIL, RCPT (both accepted) and the message: the reply to its final dot."""
    assert client.mail(SENDER)[0] == 250
    assert client.rcpt(RECIPIENT)[0] == 250
    code, text, _ = timed(lambda: client.data(MESSAGE))
    return code, text


def test_data_refused_after_the_bridges_354(scripted_upstream: Upstreams,
                                            bridge_to: Bridges) -> None:
    """The device hears the bridge's 354 while DATA is on its way upstream; the upstream's
    refusal of DATA is the reply to the final dot, and no body went upstream."""
    upstream = scripted_upstream(refuse_data="554 5.7.1 No mail from you today")
    with device(bridge_to(upstream)) as client:
        assert send_past_data(client) == (554, "5.7.1 No mail from you today")
        # The upstream session was handed back whole (no body, no final dot, no abort):
        # the device's next transaction goes over it.
        assert client.mail(SENDER)[0] == 250
        [connection] = upstream.connections
    assert connection.commands[-3:] == [b"DATA", b"RSET", f"MAIL FROM:<{SENDER}>".encode()]
    assert connection.body_bytes == 0 and connection.how is None


def test_a_250_to_data_is_no_verdict_on_the_message(scripted_upstream: Upstreams,
                                                   bridge_to: Bridges) -> None:
    """An upstream out of step answers DATA with 250 while the device already has the
    bridge's 354: the device's final dot must not hear that 250 (nothing was delivered),
    and the session, broken, is not used again."""
    upstream = scripted_upstream(refuse_data="250 2.0.0 Ok")
    with device(bridge_to(upstream)) as client:
        assert send_past_data(client) == (451, "4.5.0 " + upstream_named(upstream)
                                          + "answered DATA with 250 2.0.0 Ok")
        first = upstream.wait_ended(1, 10)
        assert client.mail(SENDER)[0] == 250  # over a new upstream session
        assert len(upstream.connections) == 2
    assert first.commands[-1] == b"DATA" and first.body_bytes == 0
    assert first.closed_by_bridge


# A body the upstream stops taking.

def test_upstream_stops_reading_the_body(scripted_upstream: Upstreams,
                                         bridge_to: Bridges) -> None:
    """After 354 the upstream reads nothing more and keeps the connection open: after
    data_timeout without progress the bridge drops it, and the device gets 451 4.4.2
    naming the upstream (or, at worst, its connection closed), not a wait forever."""
    upstream = scripted_upstream(body="stall")
    bridge = bridge_to(upstream, data_timeout=1, timeout=3)
    thread, outcome = send_in_thread(bridge, big_body(20 * 1024 * 1024))
    thread.join(20)
    assert not thread.is_alive(), "the device is still waiting after 20 s"
    if outcome.reply is not None:
        code, text = outcome.reply
        assert code == 451, text
        assert text == ("4.4.2 " + upstream_named(upstream)
                        + "took none of the message body for 1 s"), text
    else:
        assert isinstance(outcome.error, (smtplib.SMTPServerDisconnected, OSError)), \
            outcome.error
    assert outcome.seconds is not None and outcome.seconds < 8
    connection = upstream.wait_ended(1, timeout=2)
    assert connection.how == "reset", connection  # aborted by the bridge


def test_device_leaves_while_upstream_stalls(scripted_upstream: Upstreams,
                                             bridge_to: Bridges) -> None:
    """The device gives up in the middle of DATA while the upstream takes nothing: the
    bridge ends both connections (the upstream one after data_timeout, then the device's,
    whose close it reads once the body flows again)."""
    upstream = scripted_upstream(body="stall")
    # data_timeout is well beyond the time the device needs to find everything full.
    bridge = bridge_to(upstream, data_timeout=2, timeout=3)
    port = bridge.ports["legacy"]
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    replies = sock.makefile("rb")
    try:
        for command in (None, b"EHLO device.example", f"MAIL FROM:<{SENDER}>".encode(),
                        f"RCPT TO:<{RECIPIENT}>".encode(), b"DATA"):
            if command is not None:
                sock.sendall(command + b"\r\n")
            while (line := replies.readline())[3:4] == b"-":
                pass
            assert line[:1] in (b"2", b"3"), (command, line)
        assert line.startswith(b"354"), line
        sock.settimeout(0.3)
        chunk = (b"z" * 78 + b"\r\n") * 800
        sent = 0
        with pytest.raises(TimeoutError):  # everything on the way is full
            while sent < 200 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        assert held_by_bridge(port) == 1
    finally:
        replies.close()
        sock.close()
    connection = upstream.wait_ended(1, timeout=5)
    assert connection.closed_by_bridge, connection
    assert wait_until(lambda: held_by_bridge(port) == 0, timeout=5), \
        "the bridge still holds the device's connection"


# A reset in the middle of DATA.

@pytest.mark.parametrize("size", [64 * 1024, 8 * 1024 * 1024])
def test_upstream_reset_mid_body(scripted_upstream: Upstreams, bridge_to: Bridges,
                                 logged: list[str], size: int) -> None:
    """The upstream takes part of the body, then resets the connection: the device gets
    451 4.4.2 naming the upstream (not 4.3.0 internal error), and nothing is logged
    with a traceback.  A small body is all sent before the reset comes; a large one is
    still on its way."""
    upstream = scripted_upstream(body="reset", reset_after=32 * 1024)
    bridge = bridge_to(upstream, data_timeout=2, timeout=3)
    thread, outcome = send_in_thread(bridge, big_body(size))
    thread.join(20)
    assert not thread.is_alive(), "the device is still waiting after 20 s"
    assert outcome.reply is not None, outcome.error
    code, text = outcome.reply
    assert code == 451, text
    assert text.startswith("4.4.2 " + upstream_named(upstream) + "closed the connection "
                           "during "), text
    assert "internal error" not in text
    connection = upstream.wait_ended(1, timeout=2)
    assert connection.how == "reset by script", connection
    log = "\n".join(logged)
    assert "Traceback" not in log
    assert "AttributeError" not in log
    assert "Unhandled" not in log


# Upstream fan-out.

def test_upstream_sessions_are_capped_per_host(scripted_upstream: Upstreams,
                                               bridge_to: Bridges) -> None:
    """max_sessions = 2: two devices idle after MAIL FROM hold both upstream sessions;
    a third waits session_wait (1 s) and gets 451 4.3.2 without an upstream connection;
    once one of the two leaves (and its upstream session is closed) a new device gets
    through.  The upstream never sees more than two connections at once."""
    upstream = scripted_upstream()
    # session_idle = 0: no session is kept for the next transaction, so a device's QUIT
    # closes its upstream connection (tests/test_pool.py covers kept sessions).
    bridge = bridge_to(upstream, max_sessions=2, session_wait=1, timeout=3, session_idle=0)
    first, second = device(bridge), device(bridge)
    try:
        assert first.mail(SENDER)[0] == 250
        assert second.mail(SENDER)[0] == 250
        assert len(upstream.connections) == 2
        with device(bridge) as third:
            code, text, seconds = timed(lambda: third.mail(SENDER))
            assert (code, text) == (451, "4.3.2 " + upstream_named(upstream)
                                    + "has 2 sessions open already; try again later")
            assert 0.8 < seconds < 3
        assert len(upstream.connections) == 2
        first.quit()
        assert upstream.wait_ended(1, timeout=3).how == "quit"
        with device(bridge) as fourth:
            assert fourth.mail(SENDER)[0] == 250
            assert fourth.rcpt(RECIPIENT)[0] == 250
            assert fourth.data(MESSAGE)[0] == 250
        assert len(upstream.connections) == 3
    finally:
        first.close()
        second.close()
    assert upstream.max_active == 2
