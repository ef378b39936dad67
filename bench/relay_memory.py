"""How much the bridge's memory grows while it relays one large message.

The target: relaying a 50 MiB message grows the bridge's peak RSS by under
16 MiB over its idle RSS, because the body streams through with back-pressure
instead of being buffered.

The bench starts, all on 127.0.0.1 with ports the OS picks:

- an upstream (aiosmtpd, in this process) that requires STARTTLS and AUTH,
  hashes each message and throws it away;
- the bridge as its own process (``twistd --nodaemon smtpbridge``) with an
  implicit-TLS listener (AUTH required) and a STARTTLS listener, relaying to
  that upstream and verifying its certificate;
- a client that streams a generated message (lines of about 76 octets, some
  starting with ".", 8-bit text) over implicit TLS with AUTH.

It reads the bridge's VmRSS and VmHWM (peak RSS) from /proc/<pid>/status after
start-up and a small warm-up message (idle), resets the peak when the kernel
allows it, relays the large message, checks that the upstream got exactly the
bytes sent (SHA-256), and reads the peak again.

    .venv/bin/python bench/relay_memory.py [--size-mib 50] [--runs 1] [--json]

Exit status 0 when every run stays under the target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from harness import twistd_command

from smtpbridge.tls import create_self_signed
from smtpbridge.users import hash_password

MIB = 1024 * 1024
TARGET_MIB = 16.0
HOST = "127.0.0.1"

USER = "device"
PASSWORD = "bench-device-pass"
UPSTREAM_USER = "relay@example.com"
UPSTREAM_PASSWORD = "bench-upstream-pass"
SENDER = "printer@example.com"
RECIPIENT = "office@example.com"

LISTENING = re.compile(r"listener (\S+) listening on 127\.0\.0\.1:(\d+)")


# The message.

_WORDS = [
    b"Lorem", b"ipsum", b"dolor", b"sit", b"amet,", b"consectetur", b"adipiscing", b"elit,",
    b"Gr\xc3\xbc\xc3\x9fe", b"na\xc3\xafve", b"caf\xc3\xa9", b"\xe2\x80\x94",
    b"\xd0\xbf\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82", b"\xe3\x81\x93\xe3\x82\x93",
    b"Stra\xdfe", b"\xe9t\xe9",  # Latin-1 octets, not UTF-8: 8-bit data as such
    b"scan", b"0042.pdf", b"sensor", b"alarm", b"zone", b"battery", b"low",
]


def _pool_line(index: int) -> bytes:
    """One body line (without CRLF) of about 74 octets; some start with "." or are "."."""
    if index % 97 == 0:
        return b"."
    if index % 89 == 0:
        return b""
    words: list[bytes] = []
    position = index * 7
    while sum(map(len, words)) + len(words) < 74:
        words.append(_WORDS[position % len(_WORDS)])
        position = (position * 31 + 17) % 100_003
    line = b" ".join(words)[:74].rstrip(b" ")
    if index % 5 == 0:
        line = b"." + line[1:]
    elif index % 11 == 0:
        line = b".." + line[2:]
    return line


def _stuff(line: bytes) -> bytes:
    return b"." + line if line.startswith(b".") else line


class Message:
    """A generated message of about C{size} octets, produced in chunks.

    Each chunk is a block of 4096 pool lines led by a numbered line, so no two
    chunks are alike; C{chunks()} gives each chunk as the content (what the
    upstream must end up with) and as sent on the wire (dot-stuffed).
    """

    BLOCK_LINES = 4096

    def __init__(self, size: int, tag: str = "") -> None:
        self.head = (
            f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
            f"Subject: smtpbridge relay bench {tag}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode("ascii")
        lines = [_pool_line(i) for i in range(self.BLOCK_LINES)]
        self._lines = [line + b"\r\n" for line in lines]
        self._wire = [_stuff(line) + b"\r\n" for line in lines]
        self._block = b"".join(self._lines)
        self._block_wire = b"".join(self._wire)
        block_size = len(self._counter(0)) + len(self._block)
        room = max(size - len(self.head), 0)
        self._blocks = room // block_size
        rest = room - self._blocks * block_size
        self._tail = 0
        if rest:
            rest -= len(self._counter(0))
            total = 0
            while total < rest and self._tail < self.BLOCK_LINES:
                total += len(self._lines[self._tail])
                self._tail += 1
        self.size = len(self.head) + self._blocks * block_size
        if rest:
            self.size += len(self._counter(0)) + sum(map(len, self._lines[: self._tail]))

    @staticmethod
    def _counter(number: int) -> bytes:
        return b"X-Bench-Block %010d: the same pool of lines follows\r\n" % number

    def chunks(self) -> Iterator[tuple[bytes, bytes]]:
        yield self.head, self.head
        for number in range(self._blocks):
            counter = self._counter(number)
            yield counter + self._block, counter + self._block_wire
        if self._tail:
            counter = self._counter(self._blocks)
            yield (counter + b"".join(self._lines[: self._tail]),
                   counter + b"".join(self._wire[: self._tail]))

    def digest(self) -> str:
        sha = hashlib.sha256()
        for content, _ in self.chunks():
            sha.update(content)
        return sha.hexdigest()


# The upstream: aiosmtpd, STARTTLS and AUTH required, messages hashed and dropped.

def without_trace(content: bytes) -> bytes:
    """The message as the client sent it: the Received: header the bridge adds at the top
    (with its continuation lines) removed; unchanged, so that it differs, without one."""
    if not content.startswith(b"Received: "):
        return content
    end = content.find(b"\r\n") + 2
    while end > 1 and content[end:end + 1] in (b"\t", b" "):
        end = content.find(b"\r\n", end) + 2
    return content[end:] if end > 1 else content


class _Sink:
    """Keeps (size, sha256) of every message, without the bridge's Received: header, and
    discards its content."""

    def __init__(self) -> None:
        self.received: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:  # noqa: N802
        content = without_trace(envelope.original_content or b"")
        entry = (len(content), hashlib.sha256(content).hexdigest())
        envelope.original_content = envelope.content = None
        with self.lock:
            self.received.append(entry)
        return "250 2.0.0 OK hashed and discarded"

    def take(self) -> list[tuple[int, str]]:
        with self.lock:
            taken, self.received = self.received, []
        return taken


class _Controller(Controller):
    """aiosmtpd's controller, listening on a port the OS picks."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


def _authenticator(server: SMTP, session: Any, envelope: Any, mechanism: str,
                   auth_data: Any) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword)
          and auth_data.login == UPSTREAM_USER.encode()
          and auth_data.password == UPSTREAM_PASSWORD.encode())
    return AuthResult(success=ok, auth_data=auth_data if ok else None, handled=False)


def start_upstream(certificate: str, key: str, max_size: int) -> tuple[_Controller, _Sink]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    sink = _Sink()
    # aiosmtpd logs a deprecation warning at every login; nothing to act on here.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    controller = _Controller(
        sink, hostname=HOST, port=0, server_hostname="upstream.localhost",
        tls_context=context, require_starttls=True, auth_required=True,
        auth_require_tls=True, authenticator=_authenticator, decode_data=False,
        data_size_limit=max_size,
    )
    controller.start()
    return controller, sink


# The bridge.

def bridge_config(directory: Path, certificate: str, key: str, upstream_port: int,
                  max_message_size: int, password_cost: int) -> Path:
    users = directory / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD, n=2 ** password_cost)}\n")
    users.chmod(0o600)  # the bridge refuses secret files others may read
    secret = directory / "upstream-password"
    secret.write_text(UPSTREAM_PASSWORD + "\n")
    secret.chmod(0o600)
    q = json.dumps  # a JSON string is a valid TOML basic string
    path = directory / "smtpbridge.toml"
    path.write_text(f"""\
[server]
hostname = "localhost"
max_message_size = {max_message_size}

[tls]
certificate = {q(certificate)}
key = {q(key)}

[[listener]]
name = "smtps"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
auth = "required"

[[listener]]
name = "legacy"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "starttls"
auth = "optional"

[access]
trusted_networks = ["127.0.0.0/8"]
users_file = {q(str(users))}

[upstream]
host = "localhost"
port = {upstream_port}
ca_certificates = {q(certificate)}

[credentials]
mapper = "static"
username = {q(UPSTREAM_USER)}
password_file = {q(str(secret))}
""")
    return path


class Bridge:
    """The bridge in its own process, and the ports its listeners got."""

    def __init__(self, config: Path, log: Path, timeout: float = 30.0) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [twistd_command(), "--nodaemon", "--pidfile=", f"--logfile={log}",
             "smtpbridge", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.ports: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while len(self.ports) < 2:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace") \
                    if self.process.stdout else ""
                raise RuntimeError(f"the bridge exited with {self.process.returncode}:\n"
                                   f"{output}{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the bridge did not listen in {timeout:.0f}s:\n"
                                   f"{self.log_text()}")
            self.ports = {name: int(port) for name, port in LISTENING.findall(self.log_text())}
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) in bytes."""
        values: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values[name] = int(value.split()[0]) * 1024
        return values

    def reset_peak(self) -> bool:
        """Set VmHWM back to the current RSS (Linux 4.0+); False when not allowed."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


# The client.

def send(port: int, context: ssl.SSLContext, message: Message,
         timeout: float) -> tuple[float, str]:
    """Stream C{message} over implicit TLS with AUTH; (seconds of DATA, final reply)."""
    with smtplib.SMTP_SSL(HOST, port, context=context, timeout=timeout) as client:
        client.ehlo("bench.localhost")
        client.login(USER, PASSWORD)
        code, text = client.mail(SENDER, ["BODY=8BITMIME", f"SIZE={message.size}"])
        if code != 250:
            raise RuntimeError(f"MAIL refused: {code} {text!r}")
        code, text = client.rcpt(RECIPIENT)
        if code != 250:
            raise RuntimeError(f"RCPT refused: {code} {text!r}")
        client.putcmd("data")
        code, text = client.getreply()
        if code != 354:
            raise RuntimeError(f"DATA refused: {code} {text!r}")
        started = time.monotonic()
        assert client.sock is not None
        for _, wire in message.chunks():
            client.sock.sendall(wire)
        client.sock.sendall(b".\r\n")
        code, text = client.getreply()
        elapsed = time.monotonic() - started
        if code != 250:
            raise RuntimeError(f"message refused: {code} {text!r}")
        return elapsed, f"{code} {text.decode(errors='replace')}"


# One run.

def relay_once(args: argparse.Namespace, run: int, directory: Path, certificate: str,
               key: str, upstream_port: int, sink: _Sink) -> dict[str, Any]:
    message = Message(int(args.size_mib * MIB), tag=f"run {run}")
    warm_up = Message(4096, tag=f"warm-up {run}")
    run_dir = directory / f"run-{run}"
    run_dir.mkdir()
    config = bridge_config(run_dir, certificate, key, upstream_port,
                           message.size + MIB, args.password_cost)
    context = ssl.create_default_context(cafile=certificate)
    bridge = Bridge(config, run_dir / "bridge.log")
    try:
        started = bridge.memory()
        send(bridge.ports["smtps"], context, warm_up, args.timeout)
        sink.take()
        time.sleep(args.settle)
        idle = bridge.memory()
        reset = bridge.reset_peak()
        elapsed, reply = send(bridge.ports["smtps"], context, message, args.timeout)
        after = bridge.memory()
        received = sink.take()
    except BaseException:
        sys.stderr.write(bridge.log_text()[-4000:])
        raise
    finally:
        bridge.stop()
    expected = message.digest()
    intact = received == [(message.size, expected)]
    peak = after["VmHWM"] if reset else max(after["VmHWM"], idle["VmHWM"])
    growth = peak - idle["VmRSS"]
    return {
        "run": run,
        "message_bytes": message.size,
        "started_rss_mib": started["VmRSS"] / MIB,
        "idle_rss_mib": idle["VmRSS"] / MIB,
        "idle_peak_mib": idle["VmHWM"] / MIB,
        "peak_rss_mib": peak / MIB,
        "rss_after_mib": after["VmRSS"] / MIB,
        "growth_mib": growth / MIB,
        "peak_reset": reset,
        "elapsed_s": elapsed,
        "throughput_mib_s": message.size / MIB / elapsed,
        "upstream_reply": reply,
        "sha256_match": intact,
        "pass": intact and growth / MIB < args.target_mib,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=50.0,
                        help="size of the relayed message in MiB (default 50)")
    parser.add_argument("--runs", type=int, default=1,
                        help="how many times to measure, each with a fresh bridge (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--target-mib", type=float, default=TARGET_MIB,
                        help=f"allowed growth of the peak RSS in MiB (default {TARGET_MIB:g})")
    parser.add_argument("--password-cost", type=int, default=10, metavar="LOG2_N",
                        help="scrypt cost of the local user's hash (default 10; the "
                             "production default 15 makes each AUTH use 32 MiB for a moment)")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds to wait after the warm-up before reading idle RSS")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="client socket timeout in seconds (default 120)")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="smtpbridge-bench-") as temp:
        directory = Path(temp)
        certificate, key = str(directory / "cert.pem"), str(directory / "key.pem")
        create_self_signed(certificate, key, "localhost")
        max_size = int(args.size_mib * MIB) + 2 * MIB
        controller, sink = start_upstream(certificate, key, max_size)
        try:
            for run in range(1, args.runs + 1):
                result = relay_once(args, run, directory, certificate, key,
                                    controller.port, sink)
                results.append(result)
                if not args.json:
                    report(result, args.target_mib)
        finally:
            controller.stop()
    passed = all(result["pass"] for result in results)
    if args.json:
        print(json.dumps({"size_mib": args.size_mib, "target_mib": args.target_mib,
                          "pass": passed, "runs": results}))
    elif args.runs > 1:
        worst = max(result["growth_mib"] for result in results)
        print(f"worst growth {worst:.1f} MiB over {args.runs} runs: "
              f"{'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


def report(result: dict[str, Any], target: float) -> None:
    peak_note = "" if result["peak_reset"] else " (not reset after start-up)"
    print(f"run {result['run']}: {result['message_bytes'] / MIB:.1f} MiB message, "
          f"upstream sha256 {'matches' if result['sha256_match'] else 'DIFFERS'}")
    print(f"  idle RSS    {result['idle_rss_mib']:7.1f} MiB "
          f"(start-up peak {result['idle_peak_mib']:.1f} MiB)")
    print(f"  peak RSS    {result['peak_rss_mib']:7.1f} MiB{peak_note}")
    print(f"  growth      {result['growth_mib']:7.1f} MiB  target < {target:g} MiB: "
          f"{'PASS' if result['pass'] else 'FAIL'}")
    print(f"  relay       {result['elapsed_s']:7.2f} s    "
          f"{result['throughput_mib_s']:.1f} MiB/s")


if __name__ == "__main__":
    sys.exit(main())
