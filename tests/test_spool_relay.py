"""The spool end to end: a real bridge, a real aiosmtpd upstream, smtplib as the device,
and the ``smtpbridge queue`` command against the running bridge."""

from __future__ import annotations

import email
import email.policy
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.threads import blockingCallFromThread

from tests.conftest import (
    RunningBridge,
    client_context,
    front_toml,
    start_bridge,
    stop_bridge,
)
from tests.test_twistd import free_port
from tests.upstream import Upstream, start_upstream

SENDER = "scanner@example.com"
RECIPIENT = "office@example.com"
SMTPBRIDGE = os.path.join(os.path.dirname(sys.executable), "smtpbridge")


def message(n: int = 0, size: int = 0) -> bytes:
    filler = b"".join(b"line %d of a scan, with some text to fill it up\r\n" % i
                      for i in range(size // 50))
    return (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: scan {n}\r\n"
            f"Message-ID: <scan-{n}@printer.example>\r\n\r\n").encode() + \
        b".a dot line\r\n" + filler + b"the end\r\n"


class Setup:
    """A bridge with a spool in front of an upstream that may come and go."""

    def __init__(self, reactor: Any, tmp_path: Any, certificate: tuple[str, str],
                 users_file: str) -> None:
        self.reactor, self.tmp_path = reactor, tmp_path
        self.certificate, self.users_file = certificate, users_file
        self.port = free_port()
        self.upstream: Upstream | None = None
        self.bridge: RunningBridge | None = None
        self.config = ""

    def start_upstream(self, **options: Any) -> Upstream:
        self.upstream = start_upstream(str(self.tmp_path / "upstream"), port=self.port,
                                       **options)
        return self.upstream

    def start_bridge(self, **spool: object) -> RunningBridge:
        ca = str(self.tmp_path / "upstream" / "ca.pem")
        if not os.path.exists(ca):  # the CA bundle is written with the first upstream
            start_upstream(str(self.tmp_path / "upstream"), port=0).stop()
        (self.tmp_path / "upstream-password").write_text("upstream-pass-7\n")
        settings = "".join(f"{key} = {value!r}\n".replace("'", '"')
                           for key, value in spool.items())
        self.config = front_toml(self.certificate, self.users_file) + f"""
[upstream]
host = "localhost"
port = {self.port}
ca_certificates = "{ca}"
timeout = 5

[credentials]
username = "relay@example.com"
password_file = "{self.tmp_path}/upstream-password"

[spool]
directory = "{self.tmp_path}/spool"
{settings}"""
        self.bridge = start_bridge(self.reactor, self.config, str(self.tmp_path))
        return self.bridge

    @property
    def runner(self) -> Any:
        assert self.bridge is not None
        return self.bridge.service.getServiceNamed("spool")

    def send(self, data: bytes, recipients: tuple[str, ...] = (RECIPIENT,)) -> str:
        """Send over STARTTLS from the trusted network; the reply text to the final dot."""
        assert self.bridge is not None
        with smtplib.SMTP("127.0.0.1", self.bridge.ports["legacy"], timeout=30) as client:
            client.starttls(context=client_context(self.certificate))
            client.ehlo()
            code, text = client.mail(SENDER)
            if code != 250:
                raise smtplib.SMTPResponseException(code, text)
            for recipient in recipients:
                assert client.rcpt(recipient)[0] == 250
            code, text = client.data(data)
            if code != 250:
                raise smtplib.SMTPResponseException(code, text)
            return text.decode()

    def queue(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SMTPBRIDGE, "queue", "--config",
                               str(self.tmp_path / "smtpbridge.toml"), *args],
                              capture_output=True, text=True, timeout=30)

    def flush(self) -> None:
        blockingCallFromThread(self.reactor, self.runner.flush)

    def spooled(self) -> list[str]:
        return sorted(name[:-4] for name in os.listdir(self.tmp_path / "spool" / "queue")
                      if name.endswith(".msg"))

    def stop(self) -> None:
        if self.bridge is not None and self.bridge.service.running:
            stop_bridge(self.reactor, self.bridge)
        if self.upstream is not None:
            self.upstream.stop()


@pytest.fixture
def setup(reactor: Any, tmp_path: Any, certificate: tuple[str, str],
          users_file: str) -> Iterator[Setup]:
    running = Setup(reactor, tmp_path, certificate, users_file)
    yield running
    running.stop()


def wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.parametrize("size", [20_000, 300_000])  # in memory, then in a file
def test_upstream_down_then_up_delivers_byte_for_byte(setup: Setup, size: int) -> None:
    setup.start_bridge()
    data = message(1, size)
    reply = setup.send(data)
    assert reply.startswith("2.0.0 Ok: queued as ")
    [queue_id] = setup.spooled()
    assert reply.endswith(queue_id)
    upstream = setup.start_upstream()
    setup.flush()
    wait_for(lambda: len(upstream.stored()) == 1 and not setup.spooled())
    [stored] = upstream.stored()
    assert stored.sent == data
    assert stored.sender == SENDER and stored.recipients == [RECIPIENT]


def test_a_4xx_at_the_dot_is_spooled_then_delivered(setup: Setup) -> None:
    upstream = setup.start_upstream(data_reply="451 4.3.0 Try again later")
    setup.start_bridge()
    data = message(2)
    assert setup.send(data).startswith("2.0.0 Ok: queued as ")
    upstream.controller.handler.data_reply = None
    setup.flush()
    wait_for(lambda: len(upstream.stored()) == 1 and not setup.spooled())
    assert upstream.stored()[0].sent == data


def test_a_5xx_on_retry_bounces_to_the_sender(setup: Setup) -> None:
    upstream = setup.start_upstream(data_reply="451 4.3.0 Try again later")
    setup.start_bridge()
    setup.send(message(3))
    handler = upstream.controller.handler
    handler.data_reply = None
    handler.reject[RECIPIENT] = "550 5.1.1 No such user here"
    setup.flush()
    wait_for(lambda: len(upstream.stored()) == 1 and not setup.spooled())
    [bounce] = upstream.stored()
    assert bounce.recipients == [SENDER]
    parsed = email.message_from_bytes(bounce.content, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    report = str(parsed.get_payload()[1])
    assert f"Final-Recipient: rfc822; {RECIPIENT}" in report and "Status: 5.1.1" in report
    assert "Subject: scan 3" in str(parsed.get_payload()[2])


def test_a_full_spool_says_452_and_keeps_what_it_acknowledged(setup: Setup) -> None:
    setup.start_bridge(max_size=1024 * 1024)
    acknowledged = []
    refused = None
    for n in range(8):
        try:
            acknowledged.append(setup.send(message(n, 300 * 1024)))
        except smtplib.SMTPResponseException as e:
            refused = e
            break
    # At MAIL, or at the dot for a message begun while there was room: never past 1 MiB.
    assert refused is not None and (refused.smtp_code, refused.smtp_error[:5]) == \
        (452, b"4.3.1")
    assert len(acknowledged) == 3
    assert len(setup.spooled()) == len(acknowledged)
    upstream = setup.start_upstream()
    setup.flush()
    wait_for(lambda: len(upstream.stored()) == len(acknowledged) and not setup.spooled())


def test_the_queue_command_against_a_running_bridge(setup: Setup) -> None:
    setup.start_bridge(first_retry=3600, max_retry=3600)
    # The bridge runs in this process, its reactor in a thread: the SIGUSR1 handler the
    # runner installs in twistd's main thread is installed here, by the test, instead.
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: setup.reactor
                             .callFromThread(setup.runner.flush))
    try:
        queue_commands(setup)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def queue_commands(setup: Setup) -> None:
    setup.send(message(10))
    setup.send(message(11))
    first, second = setup.spooled()
    listing = setup.queue("list")
    assert listing.returncode == 0, listing.stderr
    assert first in listing.stdout and second in listing.stdout
    assert f"<{SENDER}> -> <{RECIPIENT}>" in listing.stdout
    assert "2 message(s)" in listing.stdout
    shown = setup.queue("show", first)
    assert shown.returncode == 0 and "Subject: scan 1" in shown.stdout
    assert setup.queue("hold", first).returncode == 0
    assert "(held)" in setup.queue("list").stdout
    assert setup.queue("delete", second).returncode == 0
    assert setup.spooled() == [first]
    upstream = setup.start_upstream()
    flushed = setup.queue("flush")  # SIGUSR1 to the bridge (this very test process)
    assert flushed.returncode == 0 and "1 running bridge(s) told" in flushed.stdout
    time.sleep(1)
    assert upstream.stored() == [] and setup.spooled() == [first]  # held
    assert setup.queue("release", first).returncode == 0
    wait_for(lambda: len(upstream.stored()) == 1 and not setup.spooled())
    assert setup.queue("show", "0000000000000000").returncode == 1  # no such message
    assert setup.queue("delete", "../spool").returncode == 2  # never a path


def test_a_stop_lets_an_open_transaction_finish(setup: Setup) -> None:
    upstream = setup.start_upstream()
    bridge = setup.start_bridge(drain_timeout=10)
    result: list[Any] = []
    busy = smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=30)
    idle = smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=30)
    try:
        busy.ehlo()
        busy.mail(SENDER)
        busy.rcpt(RECIPIENT)
        idle.ehlo()
        stopping = threading.Thread(
            target=lambda: result.append(blockingCallFromThread(
                setup.reactor, bridge.service.stopService)))
        stopping.start()
        time.sleep(0.5)
        assert stopping.is_alive()  # waiting for the open transaction
        assert idle.noop()[0] == 421  # an idle session was closed with 421 at once
        assert busy.data(message(20))[0] == 250
        assert busy.noop()[0] == 421  # and the busy one after its transaction
        stopping.join(10)
        assert not stopping.is_alive()
    finally:
        busy.close()
        idle.close()
    assert len(upstream.stored()) == 1


def test_a_stop_aborts_what_does_not_finish_in_time(setup: Setup) -> None:
    upstream = setup.start_upstream()
    bridge = setup.start_bridge(drain_timeout=1)
    slow = smtplib.SMTP("127.0.0.1", bridge.ports["legacy"], timeout=30)
    try:
        slow.ehlo()
        slow.mail(SENDER)
        slow.rcpt(RECIPIENT)
        slow.putcmd("DATA")
        assert slow.getreply()[0] == 354
        slow.send(b"Subject: never finished\r\n\r\nhalf a message\r\n")
        began = time.monotonic()
        stop_bridge(setup.reactor, bridge)
        assert 0.9 < time.monotonic() - began < 5
        with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
            slow.send(b".\r\n")
            slow.getreply()
    finally:
        slow.close()
    assert upstream.stored() == []  # the half message never reached the upstream
    assert setup.spooled() == []  # nor the spool: the client never had a 250
