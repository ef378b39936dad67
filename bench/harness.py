"""What bench/compare.py and bench/hostile.py share.

- certificates (one RSA self-signed certificate for localhost, used by everything),
- the processes a bench starts: the sink (bench/sink.py), the bridge (twistd) and a
  private Postfix instance, always stopped again, also on Ctrl-C,
- the load generator: asyncio + ssl, one new connection per message, per-message
  latency from connect to the reply to the final dot,
- reading RSS and CPU time from /proc.

Everything listens on 127.0.0.1, on ports the OS picks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from smtpbridge.tls import create_self_signed
from smtpbridge.users import hash_password

HOST = "127.0.0.1"
MIB = 1024 * 1024
BENCH_DIR = Path(__file__).resolve().parent

USER = "device"
PASSWORD = "bench-device-pass"
UPSTREAM_USER = "relay@example.com"
UPSTREAM_PASSWORD = "bench-upstream-pass"
SENDER = "printer@example.com"
RECIPIENT = "office@example.com"

LISTENING = re.compile(r"listener (\S+) listening on 127\.0\.0\.1:(\d+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# Set-up of the bench process.

def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def interrupt_on_sigterm() -> None:
    """SIGTERM and SIGHUP end the bench like Ctrl-C (SIGINT, even when it was inherited
    as ignored), so that its children are stopped."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.default_int_handler)


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the bench dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(command: list[str], **options: object) -> subprocess.Popen:
    """Start a child in its own session (Ctrl-C reaches only the bench, which stops it)."""
    return subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent,
                            **options)  # type: ignore[call-overload]


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after C{grace} seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    else:
        # Workers the child may have left behind in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for Postfix, which needs one)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Certificates:
    certificate: str
    key: str


def make_certificates(directory: Path) -> Certificates:
    """One RSA 2048 self-signed certificate for localhost and 127.0.0.1."""
    certificate, key = str(directory / "cert.pem"), str(directory / "key.pem")
    create_self_signed(certificate, key, "localhost")
    return Certificates(certificate, key)


def client_context(tls: Certificates) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=tls.certificate)


def message(size: int = 1024, tag: str = "bench") -> bytes:
    """A message of C{size} octets as sent after DATA, final dot included."""
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: smtpbridge {tag}\r\n"
            "Message-ID: <bench@printer.example.com>\r\n"
            "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n").encode("ascii")
    lines = []
    total = len(head)
    number = 0
    while total < size:
        line = f"line {number:05d} of a scanned page, as printers send it. ".ljust(74, "x")
        line = line[: max(size - total - 2, 0)]
        lines.append(line.encode("ascii") + b"\r\n")
        total += len(lines[-1])
        number += 1
    return head + b"".join(lines) + b".\r\n"


# /proc: RSS and CPU time.

def _status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(value.split()[0]) * 1024
    return values


def descendants(pid: int) -> list[int]:
    """C{pid} and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def rss(pid: int, tree: bool = True) -> int:
    """VmRSS in bytes of C{pid}, summed over its children when C{tree}."""
    total = 0
    for member in descendants(pid) if tree else [pid]:
        with contextlib.suppress(OSError):
            total += _status(member).get("VmRSS", 0)
    return total


def peak_rss(pid: int) -> int:
    """VmHWM (peak RSS) of one process, in bytes; 0 when it is gone."""
    try:
        return _status(pid).get("VmHWM", 0)
    except OSError:
        return 0


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes (and of their reaped children)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (user, nice, system,
    irq, softirq; not idle, iowait or steal)."""
    with open("/proc/stat") as f:
        fields = [int(value) for value in f.readline().split()[1:8]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / CLOCK_TICKS


def cpu_snapshot(relay: int | None, sink: int | None = None) -> dict[str, float]:
    """Busy CPU seconds so far of the machine, the bench (this process: the load
    generator), the sink and the relay (the bridge or Postfix, with every process below
    it); the difference of two is what a run used."""
    return {"machine": machine_busy_seconds(),
            "bench": time.process_time(),
            "sink": cpu_seconds([sink]) if sink else 0.0,
            "relay": cpu_seconds(descendants(relay)) if relay else 0.0}


def wait_for_quiet(busy_cores: float = 0.25, longest: float = 60.0,
                   window: float = 0.5) -> tuple[float, float]:
    """Wait (at most C{longest} seconds) until the machine is busy with less than
    C{busy_cores} cores over C{window} seconds; (seconds waited, cores busy last seen)."""
    started = time.monotonic()
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        cores = (machine_busy_seconds() - before) / window
        waited = time.monotonic() - started
        if cores < busy_cores or waited >= longest:
            return waited, cores


class MemoryMonitor:
    """Polls the RSS of a process tree in a thread and keeps the peak; calls C{on_limit}
    once when it reaches C{limit} bytes."""

    def __init__(self, pid: int, interval: float = 0.05, limit: int | None = None,
                 on_limit: Callable[[], None] | None = None) -> None:
        self.pid = pid
        self.interval = interval
        self.limit = limit
        self.on_limit = on_limit
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.last = rss(self.pid)
                self.peak = max(self.peak, self.last)
            if self.limit is not None and self.last >= self.limit and self.on_limit:
                on_limit, self.on_limit = self.on_limit, None
                on_limit()
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from OpenSSL import SSL

    import twisted

    info = {
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,  # the load generator's and the sink's
        "bridge_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),  # pyOpenSSL's
        "twisted": twisted.__version__,
        "postfix": postfix_version() or "not installed",
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10).stdout.strip()
    return info


# The sink: bench/sink.py in its own process.

class Sink:
    """The fast STARTTLS + AUTH upstream, counting what it receives."""

    def __init__(self, tls: Certificates | None, endless_reply: bool = False) -> None:
        command = [sys.executable, str(BENCH_DIR / "sink.py"), "--user", UPSTREAM_USER,
                   "--password", UPSTREAM_PASSWORD]
        if endless_reply:
            command.append("--endless-reply")
        else:
            assert tls is not None
            command += ["--certificate", tls.certificate, "--key", tls.key]
        self.process = spawn(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, bufsize=1)
        line = self._read_line(30.0)
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"the sink did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_line(self, timeout: float) -> str:
        import select

        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return ""
        return self.process.stdout.readline().strip()

    def counts(self) -> tuple[int, int, int]:
        """(messages, sessions, refusals) so far."""
        assert self.process.stdin is not None
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        line = self._read_line(10.0).split()
        if len(line) != 4 or line[0] != "count":
            raise RuntimeError(f"the sink did not answer: {line!r}")
        return int(line[1]), int(line[2]), int(line[3])

    @property
    def messages(self) -> int:
        return self.counts()[0]

    def wait_for(self, total: int, timeout: float) -> float | None:
        """Seconds until the sink has C{total} messages, None if not within C{timeout}."""
        started = time.monotonic()
        while True:
            if self.messages >= total:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        stop_process(self.process, 5)
        if self.process.stdout is not None:
            self.process.stdout.close()


# The bridge: twistd in its own process.

class BridgeStartError(RuntimeError):
    """The bridge did not start; the message is its own one-line reason."""


def write_users(directory: Path, password_cost: int) -> Path:
    users = directory / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD, n=2 ** password_cost)}\n")
    users.chmod(0o600)  # the bridge refuses secret files others may read
    return users


def bridge_config(directory: Path, tls: Certificates, upstream_port: int, *,
                  users: Path | None = None, workers: int | None = None,
                  upstream: str | None = None, connections: int | None = None) -> Path:
    """A bridge with one implicit-TLS listener "smtps" (AUTH optional, 127.0.0.0/8
    trusted) relaying to the sink; C{upstream} replaces the [upstream] and
    [credentials] tables.  C{connections} raises the listener's connection limits, the
    one per client address included (the load generator is a single address)."""
    q = json.dumps  # a JSON string is a valid TOML basic string
    secret = directory / "upstream-password"
    secret.write_text(UPSTREAM_PASSWORD + "\n")
    secret.chmod(0o600)
    server = f"workers = {workers}\n" if workers is not None else ""
    if connections is not None:
        server += (f"max_connections = {connections}\n"
                   f"max_connections_per_client = {connections}\n")
    access = f"users_file = {q(str(users))}\n" if users is not None else ""
    if upstream is None:
        upstream = f"""\
[upstream]
host = "127.0.0.1"
port = {upstream_port}
ca_certificates = {q(tls.certificate)}

[credentials]
mapper = "static"
username = {q(UPSTREAM_USER)}
password_file = {q(str(secret))}
"""
    path = directory / "smtpbridge.toml"
    path.write_text(f"""\
[server]
hostname = "localhost"
{server}
[tls]
certificate = {q(tls.certificate)}
key = {q(tls.key)}

[[listener]]
name = "smtps"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
auth = "optional"

[access]
trusted_networks = ["127.0.0.0/8"]
{access}
{upstream}""")
    return path


def twistd_command() -> str:
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if found is None:
        raise SystemExit("twistd not found beside the Python or on PATH")
    return found


class Bridge:
    """The bridge in its own process (twistd), and the ports its listeners got."""

    def __init__(self, config: Path, directory: Path, listeners: tuple[str, ...] = ("smtps",),
                 timeout: float = 30.0) -> None:
        self.log = directory / "bridge.log"
        self.output = directory / "bridge.out"
        with open(self.output, "wb") as out:
            self.process = spawn(
                [twistd_command(), "--nodaemon", "--pidfile=", f"--logfile={self.log}",
                 "smtpbridge", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.ports: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while not all(name in self.ports for name in listeners):
            if self.process.poll() is not None:
                raise BridgeStartError(self._reason())
            if time.monotonic() > deadline:
                self.stop()
                raise BridgeStartError(f"did not listen within {timeout:.0f} s")
            for name, port in LISTENING.findall(self.log_text()):
                self.ports.setdefault(name, int(port))
            time.sleep(0.05)

    def _reason(self) -> str:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            lines = [line.strip() for line in self.log_text().splitlines() if line.strip()]
        return lines[-1] if lines else f"exited with status {self.process.returncode}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss(self) -> int:
        """RSS in bytes, the workers' included."""
        return rss(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(descendants(self.pid))

    def stop(self) -> None:
        stop_process(self.process)


# Postfix: a private instance from a temporary directory.

def postfix_command(name: str = "postfix") -> str | None:
    return shutil.which(name) or next(
        (path for path in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}")
         if os.access(path, os.X_OK)), None)


def postfix_version() -> str | None:
    postconf = postfix_command("postconf")
    if postconf is None:
        return None
    try:
        result = subprocess.run([postconf, "-d", "-h", "mail_version"], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


POSTFIX_INSTALL = ("Postfix is not installed; for its column run bench/setup-postfix "
                   "(DEBIAN_FRONTEND=noninteractive apt-get install -y postfix, "
                   "without configuring a system mail server)")

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{port} inet n - n - - smtpd
  -o smtpd_tls_wrappermode=yes
  -o smtpd_tls_security_level=encrypt
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """Postfix as a relay: implicit TLS (wrapper mode) in, the sink as relayhost with
    STARTTLS (certificate verified: level secure) and a static SASL login out.

    Its own config, queue and data directories under C{directory}; the system's
    /etc/postfix is neither read for settings nor changed.
    """

    def __init__(self, directory: Path, tls: Certificates, sink_port: int,
                 process_limit: int = 200, concurrency: int = 50) -> None:
        command = postfix_command()
        if command is None:
            raise RuntimeError(POSTFIX_INSTALL)
        self.command = command
        self.directory = directory
        self.config = directory / "etc"
        self.queue = directory / "spool"
        data = directory / "data"
        for path in (self.config, self.queue, data):
            path.mkdir(parents=True)
        # Postfix's daemons run as the postfix user: they must reach the queue through
        # C{directory} and the bench's temporary directory that holds it (mode 0700).
        for path in (directory, directory.parent):
            path.chmod(path.stat().st_mode | 0o711)
        shutil.chown(data, "postfix")
        self.port = free_port()
        self.maillog = directory / "maillog"
        (self.config / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.maillog}
maillog_file_prefixes = {directory}
myhostname = relay.bench.localhost
mydomain = bench.localhost
mydestination =
local_recipient_maps =
local_transport = error:local delivery is off
alias_maps =
alias_database =
biff = no
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtpd_tls_cert_file = {tls.certificate}
smtpd_tls_key_file = {tls.key}
smtpd_tls_security_level = none
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = secure
smtp_tls_secure_cert_match = localhost
smtp_tls_CAfile = {tls.certificate}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = static:{UPSTREAM_USER}:{UPSTREAM_PASSWORD}
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
# Full speed: no inflow throttling, enough processes and parallel deliveries.
in_flow_delay = 0
default_process_limit = {process_limit}
initial_destination_concurrency = {concurrency}
default_destination_concurrency_limit = {concurrency}
message_size_limit = 36700160
""")
        (self.config / "master.cf").write_text(_MASTER_CF.format(port=f"{HOST}:{self.port}"))
        self._postfix("check")
        self._postfix("start")
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Postfix did not listen on {self.port}:\n"
                                       f"{self.log_tail()}")
                time.sleep(0.1)

    def _postfix(self, action: str, timeout: float = 60.0) -> str:
        """Run C{postfix -c DIR action}; its messages (which Postfix writes to stderr only
        when that is a terminal, else to syslog) come back through a pseudo-terminal."""
        import pty

        reader, writer = pty.openpty()
        try:
            result = subprocess.run([self.command, "-c", str(self.config), action],
                                    stdin=subprocess.DEVNULL, stdout=writer, stderr=writer,
                                    timeout=timeout)
            os.close(writer)
            writer = -1
            output = b""
            with contextlib.suppress(OSError):
                while True:
                    chunk = os.read(reader, 65536)
                    if not chunk:
                        break
                    output += chunk
        finally:
            for fd in (reader, writer):
                if fd >= 0:
                    os.close(fd)
        text = output.decode(errors="replace").replace("\r\n", "\n").strip()
        if result.returncode != 0 and action != "stop":
            raise RuntimeError(f"postfix {action} failed: {text or result.returncode}")
        return text

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self._postfix("stop", timeout=30)
        if pid is None:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        for member in reversed(descendants(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)


# The load generator.

@dataclass(frozen=True)
class Target:
    """Where and how a client submits.

    tls: "implicit" (TLS from the first byte) or "starttls";
    auth: None, "plain" or "login" (one login per message).
    """

    name: str
    port: int
    tls: str = "implicit"
    auth: str | None = None
    user: str = USER
    password: str = PASSWORD


class SMTPFailure(Exception):
    """The server answered with something else than the client needed."""


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPFailure("connection closed by the server")
        lines.append(line)
        if line[3:4] != b"-":
            break
    last = lines[-1]
    if not last[:3].isdigit():
        raise SMTPFailure(f"malformed reply {last[:60]!r}")
    return int(last[:3]), b"".join(lines)


async def _expect(reader: asyncio.StreamReader, code: int, step: str) -> None:
    got, text = await _reply(reader)
    if got != code:
        first = text.splitlines()[-1].decode("utf-8", "replace")[:120]
        raise SMTPFailure(f"{step}: {first}")


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes,
                   code: int, step: str) -> None:
    writer.write(line + b"\r\n")
    await _expect(reader, code, step)


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode()).decode().encode()


async def connect(target: Target, context: ssl.SSLContext, source: str | None = None,
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection (with TLS when implicit), from C{source} when given."""
    return await asyncio.open_connection(
        HOST, target.port, ssl=context if target.tls == "implicit" else None,
        server_hostname="localhost" if target.tls == "implicit" else None,
        local_addr=(source, 0) if source else None)


async def close(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await writer.wait_closed()


async def submit(target: Target, context: ssl.SSLContext, body: bytes,
                 timeout: float = 30.0, source: str | None = None) -> float:
    """Send one message on a new connection; seconds from connect to the final reply."""
    started = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await connect(target, context, source)
            await _expect(reader, 220, "greeting")
            await _command(reader, writer, b"EHLO printer.localhost", 250, "EHLO")
            if target.tls == "starttls":
                await _command(reader, writer, b"STARTTLS", 220, "STARTTLS")
                await writer.start_tls(context, server_hostname="localhost")
                await _command(reader, writer, b"EHLO printer.localhost", 250, "EHLO")
            if target.auth == "plain":
                login = _b64(f"\0{target.user}\0{target.password}")
                await _command(reader, writer, b"AUTH PLAIN " + login, 235, "AUTH PLAIN")
            elif target.auth == "login":
                await _command(reader, writer, b"AUTH LOGIN", 334, "AUTH LOGIN")
                await _command(reader, writer, _b64(target.user), 334, "AUTH LOGIN user")
                await _command(reader, writer, _b64(target.password), 235, "AUTH LOGIN password")
            await _command(reader, writer, f"MAIL FROM:<{SENDER}>".encode(), 250, "MAIL")
            await _command(reader, writer, f"RCPT TO:<{RECIPIENT}>".encode(), 250, "RCPT")
            await _command(reader, writer, b"DATA", 354, "DATA")
            writer.write(body)
            await _expect(reader, 250, "final dot")
            elapsed = time.perf_counter() - started
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(SMTPFailure, ConnectionError):
                await _expect(reader, 221, "QUIT")
    except TimeoutError:
        raise SMTPFailure(f"no answer within {timeout:g} s")
    finally:
        if writer is not None:
            await close(writer)
    return elapsed


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, SMTPFailure):
        return text
    return f"{type(error).__name__}: {text}"[:160]


@dataclass
class LoadResult:
    """What one load run saw: latencies of accepted messages, errors by kind, seconds."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def accepted(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies, p)


async def load(target: Target, context: ssl.SSLContext, body: bytes, count: int,
               concurrency: int, timeout: float = 30.0) -> LoadResult:
    """C{count} messages over C{concurrency} clients, each message on a new connection."""
    result = LoadResult()
    todo = iter(range(count))

    async def client() -> None:
        for _ in todo:
            try:
                result.latencies.append(await submit(target, context, body, timeout))
            except Exception as e:  # every failure is counted, none stops the run
                result.errors[describe(e)] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - started
    return result


Session = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(target: Target, context: ssl.SSLContext, count: int, parallel: int = 64,
                    timeout: float = 30.0, sources: Iterator[str] | None = None,
                    ) -> tuple[list[Session], Counter]:
    """C{count} sessions that finished the TLS handshake and read the greeting, left idle."""
    sessions: list[Session] = []
    errors: Counter = Counter()
    todo = iter(range(count))

    async def opener() -> None:
        for _ in todo:
            writer = None
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await connect(
                        target, context, next(sources) if sources else None)
                    await _expect(reader, 220, "greeting")
                sessions.append((reader, writer))
            except Exception as e:
                errors[describe(e) if not isinstance(e, TimeoutError)
                       else f"no greeting within {timeout:g} s"] += 1
                if writer is not None:
                    writer.transport.abort()

    await asyncio.gather(*(opener() for _ in range(parallel)))
    return sessions, errors


def abort_all(sessions: Iterable[Session]) -> None:
    for _, writer in sessions:
        writer.transport.abort()


# Figures.

def percentile(values: list[float], p: float) -> float:
    """The C{p}-th percentile (0-100) with linear interpolation; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return percentile([v for v in values if v == v], 50)


def errors_text(errors: Counter, limit: int = 3) -> str:
    return "; ".join(f"{count}x {text}" for text, count in errors.most_common(limit))
