"""Worker processes: ``[server] workers = N`` with N above 1.

The twistd process then becomes a supervisor.  It checks the configuration as a single
bridge would, opens every listener's socket (before privileges are dropped, like any
listener), stops accepting on them itself, and starts N workers, each
``twistd smtpbridge --worker K --adopt NAME=FD,...``: a bridge that adopts those sockets
(C{IReactorSocket.adoptStreamPort}), so each new connection goes to whichever worker
accepts it first.  The supervisor

- starts a worker again when it exits (after a second; longer while it keeps dying);
- passes SIGHUP on, and on SIGTERM stops the workers (killing those not gone within
  L{STOP_GRACE} seconds) before it exits itself;
- writes the workers' log lines into its own log, as ``[worker K]``;
- runs the demo upstream, when one is configured.

Everything else lives in each worker on its own: the AUTH throttle, the login cache,
the pool of upstream sessions, and the spool (``worker-K/`` in the spool directory, with
its share of max_size; see L{smtpbridge.spool}).  A worker ends when its supervisor does.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, eventAsText
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.config import Config
from smtpbridge.listener import READINESS, ListenerService
from smtpbridge.logs import plain_text
from smtpbridge.sdnotify import SystemdNotifier
from smtpbridge.service import make_service

log = Logger()

#: Seconds a worker gets to stop after SIGTERM beyond its drain_timeout (the upstream
#: sessions' QUIT takes up to 5) before it is killed.
STOP_GRACE = 10.0
#: The environment variable that tells a worker its supervisor's process id.
SUPERVISOR_PID = "SMTPBRIDGE_SUPERVISOR"
#: Seconds before a worker that exited starts again; doubled while it keeps dying within
#: L{STEADY} seconds of its start, up to L{MAX_RESTART_DELAY}.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
STEADY = 10.0
#: The first descriptor a worker finds the listening sockets at.
FIRST_FD = 3


#: Seconds a worker's log lines may wait to go to the supervisor together.
LOG_FLUSH_INTERVAL = 0.05


@implementer(ILogObserver)
class _ToSupervisor:
    """A worker's log: "LEVEL<tab>text" lines on its standard output, which the
    supervisor reads.  Lines go out together, every L{LOG_FLUSH_INTERVAL} seconds
    (L{start}): a write per line cost the supervisor a read and a turn of its reactor for
    each.  A line from another thread, or while the reactor is not running, goes out at
    once, and so does everything still waiting when the reactor has stopped.  A line
    logged in the middle of a write (by a signal handler) follows that write."""

    def __init__(self, fd: int, reactor: Any) -> None:
        self._fd = fd
        self._reactor = reactor
        self._lock = threading.RLock()  # (a signal handler may log while it is held)
        self._pending: list[str] = []
        self._writing = False

    def start(self, clock: Any, interval: float = LOG_FLUSH_INTERVAL) -> None:
        """Flush every C{interval} seconds on C{clock}, from now on."""
        loop = LoopingCall(self.flush)
        loop.clock = clock
        loop.start(interval, now=False)

    def __call__(self, event: LogEvent) -> None:
        text = plain_text(event)
        if text is None:
            text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        if not text:
            return
        level = event.get("log_level", LogLevel.info)
        name = level.name if isinstance(level, type(LogLevel.info)) else "info"
        with self._lock:
            self._pending.extend(f"{name}\t{line}\n" for line in text.splitlines())
            if self._writing:
                return
        if (not self._reactor.running
                or threading.current_thread() is not threading.main_thread()):
            self.flush()

    def flush(self) -> None:
        """Write what is pending."""
        with self._lock:
            if self._writing:
                return
            self._writing = True
            try:
                while self._pending:
                    pending, self._pending = self._pending, []
                    self._write("".join(pending).encode("utf-8", "replace"))
            finally:
                self._writing = False

    def _write(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(self._fd, data):]
            except InterruptedError:
                continue
            except OSError:
                self._pending = []
                return  # the supervisor is gone: so is this worker, soon


def worker_log() -> ILogObserver:
    """The log observer of a worker (twistd ``--logger smtpbridge.workers.worker_log``)."""
    from twisted.internet import reactor

    out = sys.__stdout__ or sys.stdout
    observer = _ToSupervisor(out.fileno(), reactor)
    reactor.callWhenRunning(observer.start, reactor)
    reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
    atexit.register(observer.flush)
    return observer


def become_worker() -> None:
    """What a worker does first.  It asks Linux to send it SIGTERM when its supervisor
    dies, so no worker goes on alone (elsewhere that step does nothing).  It starts with
    SIGHUP blocked (see L{Supervisor}): a SIGHUP passed on while it starts, and reads its
    files anyway, must not end it.  It now ignores the signal, and takes it again, until
    its certificate reload installs its own handler."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    # A supervisor that died before that step sends no signal: then go at once.
    supervisor = os.environ.get(SUPERVISOR_PID, "")
    if supervisor.isascii() and supervisor.isdigit() and os.getppid() != int(supervisor):
        os._exit(0)


def parse_adopted(text: str) -> dict[str, int]:
    """"smtps=3,legacy=4" as {"smtps": 3, "legacy": 4}."""
    adopted = {}
    for item in text.split(","):
        name, _, fd = item.rpartition("=")
        adopted[name] = int(fd)
    return adopted


_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


class _Worker(ProcessProtocol):
    """One worker process, as its supervisor sees it."""

    def __init__(self, supervisor: Supervisor, number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.started = supervisor.clock.seconds()
        self.ended: Deferred[None] = Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802, N803
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, fd: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        name, tab, text = line.partition("\t")
        level = LogLevel.error  # what a worker writes to stderr itself
        if fd == 1 and tab:
            found = _LEVELS.get(name)
            if found is None:
                text = line
            else:
                level = found
        elif line:
            text = line
        else:
            return
        log.emit(level, "{text}", text=text, log_system=f"worker {self.number}")

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        for fd, rest in self._partial.items():
            if rest:
                self._relay(fd, rest)
        self.supervisor.ended(self, reason)
        self.ended.callback(None)


class Supervisor(Service):
    """Starts C{count} workers on the sockets of C{listeners}, and keeps them running."""

    def __init__(self, reactor: Any, listeners: list[ListenerService], count: int,
                 command: Callable[[int, Mapping[str, int]], list[str]],
                 on_hangup: Callable[[], object] | None = None,
                 drain_timeout: float = 0.0) -> None:
        self._on_hangup = on_hangup
        self._stop_grace = drain_timeout + STOP_GRACE
        self.clock = reactor
        self._reactor = reactor
        self._listeners = listeners
        self._count = count
        self._command = command
        self._adopt: dict[str, int] = {}  # listener name -> descriptor in the worker
        self._fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        self._workers: dict[int, tuple[_Worker, IProcessTransport]] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._delays: dict[int, float] = {}
        self._stopping = False
        self._previous: Any = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        for fd, listener in enumerate(self._listeners, FIRST_FD):
            port: Any = listener.port
            assert port is not None, "the listeners are started first"
            port.stopReading()  # the workers accept; the supervisor only holds the socket
            self._adopt[str(listener.name).removeprefix("listener ")] = fd
            self._fds[fd] = port.fileno()
        for number in range(1, self._count + 1):
            self._start(number)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(
                signal.SIGHUP, lambda signum, frame: self._reactor.callFromThread(self.hangup))

    def _start(self, number: int) -> None:
        self._restarts.pop(number, None)
        if self._stopping:
            return
        worker = _Worker(self, number)
        args = self._command(number, self._adopt)
        # The worker starts with SIGHUP blocked (a signal mask outlives exec); until it has
        # a handler, the signal would end it.  Here it waits, pending, for a moment.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        environment = dict(os.environ, **{SUPERVISOR_PID: str(os.getpid())})
        try:
            transport = self._reactor.spawnProcess(worker, args[0], args, env=environment,
                                                   childFDs=dict(self._fds))
        except OSError as e:  # (no process could be made: fork failed)
            log.error("worker {number} could not be started: {error}", number=number, error=e)
            self._again(worker, MAX_RESTART_DELAY)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._workers[number] = (worker, transport)
        log.info("worker {number} started, process {pid}", number=number, pid=transport.pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker exited: start it again, unless the bridge is stopping."""
        if self._workers.get(worker.number, (None,))[0] is worker:
            del self._workers[worker.number]
        if self._stopping:
            return
        how = _how(reason)
        delay = RESTART_DELAY
        if self.clock.seconds() - worker.started < STEADY:
            delay = min(self._delays.get(worker.number, RESTART_DELAY / 2) * 2,
                        MAX_RESTART_DELAY)
        log.warn("worker {number} {how}; starting it again in {delay:g} s",
                 number=worker.number, how=how, delay=delay)
        self._again(worker, delay)

    def _again(self, worker: _Worker, delay: float) -> None:
        self._delays[worker.number] = delay
        self._restarts[worker.number] = self.clock.callLater(delay, self._start, worker.number)

    def signal_workers(self, name: str) -> None:
        """Send every running worker the signal C{name} ("HUP", "TERM", "KILL")."""
        for _, transport in list(self._workers.values()):
            try:
                transport.signalProcess(name)
            except (OSError, ProcessExitedAlready):
                pass  # it is gone already

    def hangup(self) -> None:
        """SIGHUP: every worker reloads its certificates and drops its idle sessions."""
        log.info("SIGHUP passed on to {count} worker(s)", count=len(self._workers))
        self.signal_workers("HUP")
        if self._on_hangup is not None:  # what the supervisor serves itself (the probe)
            self._on_hangup()

    def pids(self) -> dict[int, int]:
        """The process of each running worker, by number."""
        return {number: transport.pid for number, (_, transport) in self._workers.items()}

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        super().stopService()
        self._stopping = True
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = [worker.ended for worker, _ in self._workers.values()]
        self.signal_workers("TERM")
        kill = self.clock.callLater(self._stop_grace, self.signal_workers, "KILL")

        def done(result: object) -> None:
            if kill.active():
                kill.cancel()
            log.info("every worker stopped")

        return DeferredList(ended).addCallback(done)


def _how(reason: Failure) -> str:
    """How a process ended, in words."""
    if reason.check(ProcessDone):
        return "exited"
    killed_by = getattr(reason.value, "signal", None)
    if killed_by:
        return f"was killed by signal {killed_by}"
    return f"exited with status {getattr(reason.value, 'exitCode', '?')}"


#: A worker's Python: twistd.
_WORKER_MAIN = "from twisted.scripts.twistd import run; run()"


def worker_command(config_path: str,
                   count: int) -> Callable[[int, Mapping[str, int]], list[str]]:
    """How a worker is started: this Python running twistd, logging to its supervisor."""
    def command(number: int, adopt: Mapping[str, int]) -> list[str]:
        return [sys.executable, "-c", _WORKER_MAIN, "--nodaemon", "--pidfile=",
                "--logger=smtpbridge.workers.worker_log", "smtpbridge",
                "--config", os.path.abspath(config_path), "--worker", str(number),
                "--worker-count", str(count),
                "--adopt", ",".join(f"{name}={fd}" for name, fd in adopt.items())]
    return command


def supervisor_service(config: Config, reactor: Any) -> MultiService:
    """The supervisor of C{config.server.workers} workers: the whole bridge is built as a
    single process would build it (every check, every file read, so that a bad
    configuration stops the start here), and only its listeners are kept, to open the
    sockets the workers adopt (and the demo upstream and the admin listener with its
    readiness probe, which the supervisor serves)."""
    single = make_service(config, reactor)
    top = MultiService()
    listeners = []
    reloader = single.getServiceNamed("certificates")
    for child in list(single):
        if isinstance(child, ListenerService) or child.name == READINESS:
            child.disownServiceParent()
            child.setServiceParent(top)
            if str(child.name).startswith("listener "):
                listeners.append(child)
    supervisor = Supervisor(reactor, listeners, config.server.workers,
                            worker_command(config.path, config.server.workers),
                            on_hangup=reloader.reload, drain_timeout=config.spool.drain_timeout)
    supervisor.setName("workers")
    supervisor.setServiceParent(top)
    for child in top:
        if child.name == READINESS:  # no worker running: no mail is taken
            child.also = lambda: None if supervisor.pids() else "no worker is running"
    for child in list(single):  # last: systemd hears READY=1 once the workers started
        if isinstance(child, SystemdNotifier):
            child.disownServiceParent()
            child.setServiceParent(top)
    return top
