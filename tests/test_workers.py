"""``[server] workers = 2`` with real processes: a twistd supervisor and its two workers,
serving the demo configuration on ports the OS picks."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import attr
import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger

from smtpbridge.config import ConfigError, parse_config
from smtpbridge.model import Envelope
from smtpbridge.spool import Spool
from smtpbridge.workers import _ToSupervisor, parse_adopted
from tests.conftest import stored_messages
from tests.test_config import MINIMAL
from tests.test_twistd import TWISTD, demo_copy

SMTPBRIDGE = os.path.join(os.path.dirname(sys.executable), "smtpbridge")
WORKER_STARTED = re.compile(r"worker (\d+) started, process (\d+)")


def wait_for(condition: Callable[[], object], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@attr.define
class Supervised:
    """A running supervisor: its process, log and the ports of its listeners."""

    process: subprocess.Popen[bytes]
    log_path: Path
    mail_dir: str
    ports: dict[str, int] = attr.Factory(dict)
    sent: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def workers(self) -> dict[int, int]:
        """The process of each worker number, as the supervisor last started it."""
        return {int(n): int(pid) for n, pid in WORKER_STARTED.findall(self.log())}

    def children(self) -> set[int]:
        pid = self.process.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except FileNotFoundError:
            return set()
        return {int(child) for child in text.split()}

    def served_by(self) -> dict[int, int]:
        """How many messages each worker took, from the log."""
        counts: dict[int, int] = {}
        for n in re.findall(r"\[worker (\d+)\] \w+ status=sent ", self.log()):
            counts[int(n)] = counts.get(int(n), 0) + 1
        return counts

    def send(self, count: int) -> None:
        """C{count} messages at once, each on its own connection (no AUTH: trusted)."""
        errors: list[BaseException] = []
        first, self.sent = self.sent, self.sent + count

        def one(n: int) -> None:
            try:
                with smtplib.SMTP("127.0.0.1", self.ports["legacy"], timeout=30) as client:
                    client.sendmail("printer@example.com", ["office@example.com"],
                                    f"Subject: {n}\r\n\r\nhello\r\n".encode())
            except BaseException as e:  # reported below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=one, args=(n,)) for n in range(first, first + count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(
        f"/proc/{pid}/status").read_text().lower()


@pytest.fixture
def supervised(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Supervised]:
    """The demo with two workers; an indirect parameter adds lines to its [spool], or a
    table when it starts with one."""
    path = demo_copy(tmp_path)
    text = Path(path).read_text().replace('hostname = "localhost"',
                                          'hostname = "localhost"\nworkers = 2', 1)
    extra = getattr(request, "param", "")
    if extra.startswith("["):  # a table of its own
        text += f"\n{extra}\n"
    else:
        text = text.replace("[spool]\n", f"[spool]\n{extra}\n", 1)
    Path(path).write_text(text)
    log_path = tmp_path / "bridge.log"
    process = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", f"--logfile={log_path}",
                                "smtpbridge", "--config", path],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running = Supervised(process, log_path, str(tmp_path / "var" / "mail"))
    try:
        wait_for(lambda: len(re.findall(r"\[worker \d\] \d+ start-up objects frozen",
                                        running.log())) == 2 or process.poll() is not None)
        assert process.poll() is None, running.log()
        for name, port in re.findall(r"\] listener (\w+) listening on 127.0.0.1:(\d+)",
                                     running.log()):
            running.ports[name] = int(port)
        yield running
    finally:
        workers = running.children()
        if process.poll() is None:
            process.terminate()
            process.wait(30)
        wait_for(lambda: not any(map(alive, workers)), 15)


def test_two_workers_share_the_listeners(supervised: Supervised) -> None:
    assert set(supervised.workers()) == {1, 2}
    assert supervised.children() == set(supervised.workers().values())
    log = supervised.log()
    # Both adopted the supervisor's sockets: the same ports.
    for name in ("smtps", "legacy"):
        ports = re.findall(rf"\] listener {name} listening on 127.0.0.1:(\d+)", log)
        assert len(ports) == 3 and len(set(ports)) == 1, ports
    sent = 0
    while len(supervised.served_by()) < 2:
        assert sent < 200, supervised.served_by()
        supervised.send(10)
        sent += 10
    # (A worker's log lines reach the supervisor every LOG_FLUSH_INTERVAL seconds.)
    wait_for(lambda: sum(supervised.served_by().values()) == sent, 5)
    assert len(stored_messages(supervised.mail_dir)) == sent


@pytest.mark.parametrize("supervised", ['mode = "always"'], indirect=True)
def test_each_worker_delivers_from_a_spool_of_its_own(supervised: Supervised,
                                                      tmp_path: Path) -> None:
    spool = tmp_path / "var" / "spool"
    assert sorted(p.name for p in spool.iterdir() if p.name.startswith("worker-")) == [
        "worker-1", "worker-2"]
    sent = 0
    while len(supervised.served_by()) < 2:  # "always": every message through the spool
        assert sent < 200, supervised.served_by()
        supervised.send(10)
        sent += 10
    wait_for(lambda: len(stored_messages(supervised.mail_dir)) >= sent)
    time.sleep(0.5)
    subjects = [re.search(rb"Subject: (\d+)", m).group(1)  # type: ignore[union-attr]
                for m in stored_messages(supervised.mail_dir)]
    assert sorted(int(s) for s in subjects) == list(range(sent))  # each message once
    for worker in (1, 2):
        assert list((spool / f"worker-{worker}" / "queue").iterdir()) == []
        assert re.search(rf"\[worker {worker}\] \w+ status=spooled ", supervised.log())
    listing = subprocess.run([SMTPBRIDGE, "queue", "--config", str(tmp_path / "demo.toml"),
                              "list"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "0 message(s)" in listing.stdout, listing.stderr


@pytest.mark.parametrize("supervised", ['mode = "always"'], indirect=True)
def test_a_worker_started_again_counts_the_supervisors_workers(supervised: Supervised,
                                                               tmp_path: Path) -> None:
    """The file says 1 worker now, but 2 still run: worker 1, started again, must not
    take over worker 2's spool."""
    second = Spool(str(tmp_path / "var" / "spool" / "worker-2"), 10**8)
    writer = second.writer()
    writer.write([b"Subject: held", b"", b"hi"])
    writer.commit(Envelope(writer.id, "a@example.com", ("b@example.com",), "default",
                           time.time(), writer.size))
    second.hold(writer.id)  # (worker 2 does not know of it: it stays)
    config = tmp_path / "demo.toml"
    config.write_text(config.read_text().replace("workers = 2", "workers = 1"))
    old = supervised.workers()[1]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: supervised.workers()[1] != old)
    wait_for(lambda: len(re.findall(r"\[worker 1\] \d+ start-up objects frozen",
                                    supervised.log())) == 2)
    assert second.ids() == [writer.id]
    assert "taken over" not in supervised.log()


@pytest.mark.parametrize(
    "supervised", ['[admin]\nendpoint = "tcp:0:interface=127.0.0.1"\nprobe_interval = 1'],
    indirect=True)
def test_the_supervisor_serves_health_and_readiness_but_not_metrics(
        supervised: Supervised) -> None:
    port = int(re.findall(r"\] admin listening on 127.0.0.1:(\d+)", supervised.log())[0])

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    assert get("/healthz") == (200, "ok\n")
    wait_for(lambda: get("/readyz")[0] == 200)  # the supervisor probes the upstream
    status, text = get("/metrics")
    assert status == 501 and "workers" in text


def test_a_dead_worker_is_started_again(supervised: Supervised) -> None:
    old = supervised.workers()[1]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: supervised.workers()[1] != old)
    new = supervised.workers()[1]
    assert "worker 1 was killed by signal 9; starting it again in 1 s" in supervised.log()
    wait_for(lambda: supervised.children() == {new, supervised.workers()[2]})
    wait_for(lambda: len(re.findall(r"\[worker 1\] listener legacy listening",
                                    supervised.log())) == 2)
    supervised.send(5)
    assert len(stored_messages(supervised.mail_dir)) == 5


def test_sighup_reaches_every_worker(supervised: Supervised) -> None:
    workers = supervised.workers()
    os.kill(supervised.process.pid, signal.SIGHUP)
    wait_for(lambda: all(f"[worker {n}] certificates reloaded" in supervised.log()
                         for n in (1, 2)))
    # The supervisor too: its readiness probe verifies upstreams with fresh TLS settings.
    wait_for(lambda: re.search(r"#info\] certificates reloaded", supervised.log()))
    assert supervised.process.poll() is None and supervised.workers() == workers


def test_a_sighup_while_a_worker_starts_does_not_end_it(supervised: Supervised) -> None:
    old = supervised.workers()[2]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: supervised.workers()[2] != old, 10)
    new = supervised.workers()[2]
    frozen = re.compile(r"\[worker 2\] \d+ start-up objects frozen")
    deadline = time.monotonic() + 30
    while len(frozen.findall(supervised.log())) < 2:  # SIGHUPs all the while it starts
        assert time.monotonic() < deadline, supervised.log()
        os.kill(supervised.process.pid, signal.SIGHUP)
        time.sleep(0.05)
    os.kill(supervised.process.pid, signal.SIGHUP)
    wait_for(lambda: "[worker 2] certificates reloaded" in supervised.log())
    assert supervised.workers()[2] == new and alive(new)


def test_sigterm_stops_every_process(supervised: Supervised) -> None:
    workers = supervised.children()
    assert len(workers) == 2
    supervised.process.send_signal(signal.SIGTERM)
    assert supervised.process.wait(30) == -signal.SIGTERM  # twistd ends with the signal
    wait_for(lambda: not any(map(alive, workers)), 15)
    log = supervised.log()
    assert "every worker stopped" in log and log.rstrip().endswith("Server Shut Down.")
    assert "starting it again" not in log


def test_workers_end_with_their_supervisor(supervised: Supervised) -> None:
    workers = supervised.children()
    supervised.process.kill()
    supervised.process.wait(30)
    wait_for(lambda: not any(map(alive, workers)), 15)


def test_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    base = MINIMAL
    assert parse_config(base, "/x.toml").server.workers == 1
    config = parse_config('[server]\nhostname = "h"\nworkers = 4\n' + base, "/x.toml")
    assert config.server.workers == 4
    with pytest.raises(ConfigError, match="server.workers"):
        parse_config('[server]\nhostname = "h"\nworkers = 0\n' + base, "/x.toml")
    assert parse_adopted("smtps=3,legacy=4") == {"smtps": 3, "legacy": 4}
    from twisted.python.usage import UsageError

    from smtpbridge.tap import Options

    options = Options()
    options.parseOptions(["--worker", "2", "--worker-count", "3"])
    assert (options["worker"], options["worker-count"]) == ("2", "3")
    for bad in (["--worker", "0"], ["--worker-count", "two"], ["--worker-count", "-1"],
                ["--worker", "\u00b2"]):
        with pytest.raises(UsageError, match="from 1 up"):
            Options().parseOptions(bad)


# A worker's log lines, on their way to the supervisor.

class _Reactor(Clock):
    running = True


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def test_a_workers_lines_go_out_together() -> None:
    read, write = os.pipe()
    reactor = _Reactor()
    observer = _ToSupervisor(write, reactor)
    observer.start(reactor, 0.05)
    log = Logger(observer=observer, namespace="t")
    log.info("connect from {peer}", peer="[192.0.2.1]")
    log.warn("two\nlines")
    assert _read_all(read) == b""  # not before the flush
    reactor.advance(0.05)
    assert _read_all(read) == (b"info\tconnect from [192.0.2.1]\n"
                               b"warn\ttwo\nwarn\tlines\n")
    reactor.advance(0.05)
    assert _read_all(read) == b""
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("it broke")
    reactor.advance(0.05)
    written = _read_all(read).decode()
    assert written.startswith("critical\tit broke\n") and "ZeroDivisionError" in written
    assert all(line.startswith("critical\t") for line in written.splitlines())
    os.close(read)
    os.close(write)


def test_a_workers_line_logged_during_a_write_follows_it() -> None:
    """A signal handler may log while the observer writes: no deadlock, and its line
    comes after the lines being written."""
    read, write = os.pipe()
    reactor = _Reactor()
    observer = _ToSupervisor(write, reactor)
    log = Logger(observer=observer, namespace="t")
    log.info("first")
    written: list[bytes] = []
    original = observer._write

    def interrupted(data: bytes) -> None:
        written.append(data)
        if len(written) == 1:
            log.warn("from a signal handler")  # (re-entered, in the same thread)
        original(data)

    observer._write = interrupted  # type: ignore[method-assign]
    observer.flush()
    assert written == [b"info\tfirst\n", b"warn\tfrom a signal handler\n"]
    assert _read_all(read) == b"info\tfirst\nwarn\tfrom a signal handler\n"
    os.close(read)
    os.close(write)


def test_a_workers_line_from_another_thread_or_a_stopped_reactor_goes_out_at_once(
        ) -> None:
    read, write = os.pipe()
    reactor = _Reactor()
    log = Logger(observer=_ToSupervisor(write, reactor), namespace="t")
    thread = threading.Thread(target=lambda: log.error("from a thread"))
    thread.start()
    thread.join()
    assert _read_all(read) == b"error\tfrom a thread\n"
    log.info("while the reactor runs")
    assert _read_all(read) == b""
    reactor.running = False  # stopped: what waits, and what comes now, go at once
    log.info("after the reactor stopped")
    assert _read_all(read) == (b"info\twhile the reactor runs\n"
                               b"info\tafter the reactor stopped\n")
    assert reactor.getDelayedCalls() == []
    os.close(read)
    os.close(write)
