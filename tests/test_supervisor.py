"""The supervisor of worker processes, on a fake reactor: a worker that cannot be
started is tried again, the stop waits the drain before it kills, and a worker whose
supervisor is gone before it could ask to follow it goes at once."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from twisted.internet.error import ProcessDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from smtpbridge import workers
from smtpbridge.workers import MAX_RESTART_DELAY, STOP_GRACE, SUPERVISOR_PID, Supervisor


class _Process:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:  # noqa: N802
        self.signals.append(name)


class _Reactor(Clock):
    """Spawns nothing: records each process, or fails while C{failing} says so."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = 0
        self.spawned: list[tuple[Any, _Process, dict[str, str]]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str],  # noqa: N802
                     env: dict[str, str], childFDs: dict[int, Any]) -> _Process:  # noqa: N803
        if self.failing:
            self.failing -= 1
            raise OSError(11, "Resource temporarily unavailable")
        process = _Process(1000 + len(self.spawned))
        self.spawned.append((protocol, process, env))
        return process


def supervisor(reactor: _Reactor, count: int = 2, drain: float = 30.0) -> Supervisor:
    found = Supervisor(reactor, [], count, lambda number, adopt: ["python", str(number)],
                       drain_timeout=drain)
    return found


def test_a_worker_that_cannot_be_started_is_started_later() -> None:
    reactor = _Reactor()
    reactor.failing = 1
    service = supervisor(reactor)
    service.startService()
    try:
        assert sorted(service.pids()) == [2]  # the fork for worker 1 failed
        reactor.advance(MAX_RESTART_DELAY)
        assert sorted(service.pids()) == [1, 2]
    finally:
        reactor.advance(0)
        service.stopService()


def test_the_workers_get_the_drain_before_they_are_killed() -> None:
    reactor = _Reactor()
    service = supervisor(reactor, count=1, drain=30)
    service.startService()
    [(worker, process, environment)] = reactor.spawned
    assert environment[SUPERVISOR_PID] == str(os.getpid())
    stopped = service.stopService()
    assert process.signals == ["TERM"]
    reactor.advance(30 + STOP_GRACE - 0.1)
    assert process.signals == ["TERM"]  # still draining
    reactor.advance(0.1)
    assert process.signals == ["TERM", "KILL"]
    worker.processEnded(Failure(ProcessDone(0)))
    assert stopped.called


@pytest.mark.parametrize("parent_is_supervisor", [True, False])
def test_a_worker_whose_supervisor_is_gone_goes_at_once(parent_is_supervisor: bool) -> None:
    script = ("from smtpbridge.workers import become_worker\n"
              "become_worker()\nprint('serving')\n")
    environment = dict(os.environ, **{SUPERVISOR_PID: str(os.getpid() if parent_is_supervisor
                                                          else 1)})
    result = subprocess.run([sys.executable, "-c", script], env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert ("serving" in result.stdout) is parent_is_supervisor


def test_the_stop_grace_is_what_the_unit_allows() -> None:
    """systemd kills the whole unit after TimeoutStopSec: it must leave the drain, the
    upstream sessions' QUIT and the supervisor's own grace their time."""
    unit = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc",
                        "systemd", "smtpbridge.service")
    text = open(unit, encoding="utf-8").read()
    timeout = int(text.split("TimeoutStopSec=")[1].split("s")[0])
    assert timeout >= 30 + 5 + 5  # the default drain_timeout, the QUIT grace, a margin
    assert workers.STOP_GRACE >= 5


def test_workers_are_refused_a_unix_socket_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_config import MINIMAL, error_of

    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    text = "[server]\nworkers = 2\n" + MINIMAL.replace('"tcp:2525"', '"unix:/run/s.sock"')
    assert error_of(text).endswith(": listener[0].endpoint: workers above 1 share TCP "
                                   "sockets only; a UNIX socket needs [server] workers = 1")


def test_a_worker_stops_on_a_listener_its_supervisor_does_not_hold(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from smtpbridge.config import parse_config
    from smtpbridge.errors import ConfigError
    from smtpbridge.service import make_service
    from tests.test_config import MINIMAL

    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    config = parse_config(MINIMAL + f'\n[spool]\ndirectory = "{tmp_path}/spool"\n',
                          str(tmp_path / "c.toml"))
    with pytest.raises(ConfigError) as error:
        make_service(config, Clock(), adopted={"other": 3}, worker=1, workers=2)
    assert (error.value.key, error.value.file) == ("listener[0]", str(tmp_path / "c.toml"))


@pytest.mark.parametrize("directory", ["/proc/no-such/spool", "/etc/passwd/spool"])
def test_a_spool_directory_that_cannot_be_made_stops_the_start_in_one_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any, directory: str) -> None:
    from smtpbridge.config import parse_config
    from smtpbridge.errors import ConfigError
    from smtpbridge.service import make_service
    from tests.test_config import MINIMAL

    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    config = parse_config(MINIMAL + f'\n[spool]\ndirectory = "{directory}"\n',
                          str(tmp_path / "c.toml"))
    with pytest.raises(ConfigError) as error:
        make_service(config, Clock())
    assert error.value.key == "spool.directory"
    assert str(error.value).startswith(f"{tmp_path}/c.toml: spool.directory: cannot create "
                                       f"{directory}: ")


def test_each_worker_allows_its_share_of_the_rate_limits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from smtpbridge.config import parse_config
    from smtpbridge.service import _rate_limits
    from tests.test_config import MINIMAL

    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    config = parse_config("[rate_limits]\naccount_messages_per_minute = 30\n"
                          "client_messages_per_minute = 1\n" + MINIMAL, "/x/c.toml")
    alone = _rate_limits(config, Clock(), None)
    shared = _rate_limits(config, Clock(), None, 4)
    assert alone is not None and shared is not None
    assert alone.settings.account_messages_per_minute == 30
    assert shared.settings.account_messages_per_minute == 7  # 4 x 7 <= 30
    assert shared.settings.client_messages_per_minute == 1  # (never below one)
    assert shared.settings.account_recipients_per_day == 0  # no limit stays none


def test_the_supervisor_is_not_ready_while_no_worker_runs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from smtpbridge.config import parse_config
    from smtpbridge.listener import READINESS
    from smtpbridge.workers import supervisor_service
    from tests.test_config import MINIMAL

    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    config = parse_config(
        "[server]\nworkers = 2\n" + MINIMAL + f'\n[spool]\ndirectory = "{tmp_path}/spool"\n'
        '[admin]\nendpoint = "tcp:0:interface=127.0.0.1"\n', str(tmp_path / "c.toml"))
    top = supervisor_service(config, Clock())
    [probe] = [child for child in top if child.name == READINESS]
    probe.results = {}  # every upstream probed and fine
    assert probe.status() == (False, "not ready: no worker is running\n")
    workers_service = top.getServiceNamed("workers")
    monkeypatch.setattr(workers_service, "pids", lambda: {1: 4242})
    assert probe.status() == (True, "ready\n")


def test_a_worker_just_gone_does_not_stop_the_signal_to_the_others() -> None:
    from twisted.internet.error import ProcessExitedAlready

    reactor = _Reactor()
    service = supervisor(reactor, count=2)
    service.startService()
    [(_, first, _), (_, second, _)] = reactor.spawned

    def gone(name: str) -> None:
        raise ProcessExitedAlready()

    first.signalProcess = gone  # type: ignore[method-assign]
    service.stopService()
    assert second.signals == ["TERM"]
