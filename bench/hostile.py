"""The bridge under hostile load: its RSS, and whether a normal client still gets through.

Each scenario starts a fresh bridge, sends one message as a normal client
(trusted network, implicit TLS, no AUTH, from 127.0.0.2) for reference, then starts the attack
in a process of its own and, once the attack is in place, measures how long the
normal client takes to send one message (given up after 30 s: "blocked") and
the bridge's peak RSS while the attack lasts:

- idle-tls: 3,000 idle TLS sessions (handshake done, greeting read);
- silent-tcp: 1,000 TCP connections that never send a byte (no TLS ClientHello);
- pipelining: one client that pipelines EHLO commands and never reads a reply;
- auth-storm: 1,000 clients, each from its own address in 127.1.0.0/16 onwards (outside
  the trusted 127.0.0.0/16), failing AUTH LOGIN over and over;
- endless-reply: a client whose sender is mapped (per-sender) to an upstream
  route whose server sends a 220- greeting that never ends.

Targets: the peak RSS stays under 300 MiB, and the normal client's message gets
through in under 2 s, in every scenario.

    .venv/bin/python bench/hostile.py [--scenarios idle-tls,pipelining] [--json]

Exit status 0 when every scenario meets both targets, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import harness
from harness import MIB, Bridge, Certificates, MemoryMonitor, Sink, Target

SCENARIOS = ("idle-tls", "silent-tcp", "pipelining", "auth-storm", "endless-reply")
RSS_TARGET_MIB = 300.0
CLIENT_TARGET_S = 2.0
ATTACKER = "attacker@hostile.example"
HOSTILE_USER = "hostile@example.com"
# The normal client is another host than the attacker (127.0.0.1), as on a real network:
# a per-client connection limit holds one host back, not everyone.
NORMAL_SOURCE = "127.0.0.2"


# The attacks, each run in its own process: `hostile.py --attack NAME ...`.
# They print JSON lines: {"event": "ready", ...} once in place, {"event": "stats", ...}
# when their standard input closes, and then exit.

def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (what it sent last may still be unread)."""
    return reader.at_eof() or bool(getattr(reader, "_eof", False))


def storm_address(index: int) -> str:
    """The index-th address of 127.1.0.1 onwards (250 per /24)."""
    return f"127.{1 + index // 62500}.{(index // 250) % 250}.{index % 250 + 1}"


async def attack_idle_tls(args: argparse.Namespace, target: Target,
                          context: Any) -> dict[str, Any]:
    sessions, errors = await harness.open_idle(target, context, args.count,
                                               timeout=args.timeout)
    return await hold_open(sessions, errors, f"{len(sessions)}/{args.count} TLS sessions open")


async def hold_open(sessions: list[harness.Session], errors: Counter,
                    detail: str) -> dict[str, Any]:
    """Say the attack is in place, keep C{sessions} open until it is stopped, then count
    those the bridge closed meanwhile."""
    emit("ready", detail=detail, errors=dict(errors))
    await until_stdin_closes()
    closed = sum(1 for reader, _ in sessions if closed_by_peer(reader))
    harness.abort_all(sessions)
    return {"open": len(sessions), "errors": dict(errors), "closed_by_bridge": closed}


async def attack_silent_tcp(args: argparse.Namespace, target: Target,
                            context: Any) -> dict[str, Any]:
    sessions: list[harness.Session] = []
    errors: Counter = Counter()
    todo = iter(range(args.count))

    async def opener() -> None:
        for _ in todo:
            try:
                async with asyncio.timeout(args.timeout):
                    reader, writer = await asyncio.open_connection(harness.HOST, target.port)
                sessions.append((reader, writer))
            except Exception as e:
                errors[harness.describe(e)] += 1

    await asyncio.gather(*(opener() for _ in range(64)))
    return await hold_open(sessions, errors,
                           f"{len(sessions)}/{args.count} silent connections open")


async def attack_pipelining(args: argparse.Namespace, target: Target,
                            context: Any) -> dict[str, Any]:
    chunk = b"EHLO flood.example\r\n" * 4096
    sent = 0
    connections = 0
    errors: Counter = Counter()
    stop = asyncio.Event()
    ready = False

    async def flood() -> None:
        nonlocal sent, connections, ready
        while not stop.is_set():
            writer = None
            try:
                # A small reader limit: once 128 KiB of replies wait unread, this side
                # stops reading from the socket altogether.
                reader, writer = await asyncio.open_connection(
                    harness.HOST, target.port, ssl=context, server_hostname="localhost",
                    limit=65536)
                connections += 1
                async with asyncio.timeout(args.timeout):
                    await harness._expect(reader, 220, "greeting")
                while not stop.is_set():
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
                    if not ready and sent >= MIB:
                        ready = True
                        emit("ready", detail="flooding with pipelined EHLO")
            except Exception as e:
                errors[harness.describe(e)] += 1
                await asyncio.sleep(0.5)
            finally:
                if writer is not None:
                    writer.transport.abort()

    task = asyncio.get_running_loop().create_task(flood())
    await until_stdin_closes()
    stop.set()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if not ready:
        emit("ready", detail="never got 1 MiB of commands in")
    return {"sent_mib": sent / MIB, "connections": connections, "errors": dict(errors)}


async def attack_auth_storm(args: argparse.Namespace, target: Target,
                            context: Any) -> dict[str, Any]:
    replies: Counter = Counter()
    errors: Counter = Counter()
    connections = 0
    started: set[int] = set()
    stop = asyncio.Event()
    all_started = asyncio.Event()
    user = harness._b64(harness.USER)

    async def client(index: int) -> None:
        nonlocal connections
        source = storm_address(index)
        attempt = 0
        while not stop.is_set():
            writer = None
            blocked = False
            try:
                async with asyncio.timeout(args.timeout):
                    reader, writer = await harness.connect(target, context, source)
                    connections += 1
                    await harness._expect(reader, 220, "greeting")
                    await harness._command(reader, writer, b"EHLO storm.example", 250, "EHLO")
                while not stop.is_set():
                    async with asyncio.timeout(args.timeout):
                        attempt += 1
                        writer.write(b"AUTH LOGIN\r\n")
                        started.add(index)
                        if len(started) == args.count:
                            all_started.set()
                        code, _ = await harness._reply(reader)
                        if code == 334:
                            writer.write(user + b"\r\n")
                            code, _ = await harness._reply(reader)
                        if code == 334:
                            writer.write(harness._b64(f"wrong-{index}-{attempt}") + b"\r\n")
                            code, _ = await harness._reply(reader)
                    replies[code] += 1
                    if code in (421, 454):
                        blocked = code == 454
                        break
            except Exception as e:
                errors[harness.describe(e) if not isinstance(e, TimeoutError)
                       else f"no reply within {args.timeout:g} s"] += 1
            finally:
                if writer is not None:
                    writer.transport.abort()
            await asyncio.sleep(1.0 if blocked else 0.1)

    tasks = [asyncio.get_running_loop().create_task(client(i)) for i in range(args.count)]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.timeout):
            await all_started.wait()
    emit("ready", detail=f"{len(started)}/{args.count} addresses trying AUTH LOGIN")
    await until_stdin_closes()
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"addresses": len(started), "connections": connections,
            "attempts": sum(replies.values()),
            "replies": {str(code): count for code, count in replies.items()},
            "errors": dict(errors)}


async def attack_endless_reply(args: argparse.Namespace, target: Target,
                               context: Any) -> dict[str, Any]:
    replies: Counter = Counter()
    errors: Counter = Counter()
    stop = asyncio.Event()
    ready = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            writer = None
            try:
                async with asyncio.timeout(args.timeout):
                    reader, writer = await harness.connect(target, context)
                    await harness._expect(reader, 220, "greeting")
                    await harness._command(reader, writer, b"EHLO hostile.example", 250, "EHLO")
                writer.write(f"MAIL FROM:<{ATTACKER}>\r\n".encode())
                ready.set()
                # The bridge answers only when its upstream session fails or times out.
                code, text = await harness._reply(reader)
                replies[text.splitlines()[-1].decode("utf-8", "replace")[:100]] += 1
            except Exception as e:
                errors[harness.describe(e)] += 1
                await asyncio.sleep(0.5)
            finally:
                if writer is not None:
                    writer.transport.abort()

    task = asyncio.get_running_loop().create_task(client())
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.timeout):
            await ready.wait()
    emit("ready", detail="MAIL FROM sent; the upstream's greeting never ends")
    await until_stdin_closes()
    stop.set()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return {"replies": dict(replies), "errors": dict(errors)}


ATTACKS = {
    "idle-tls": attack_idle_tls,
    "silent-tcp": attack_silent_tcp,
    "pipelining": attack_pipelining,
    "auth-storm": attack_auth_storm,
    "endless-reply": attack_endless_reply,
}


def run_attack(args: argparse.Namespace) -> int:
    harness.raise_fd_limit()
    target = Target("bridge", args.port)
    context = harness.client_context(Certificates(args.ca, ""))

    async def main() -> None:
        stats = await ATTACKS[args.attack](args, target, context)
        emit("stats", **stats)

    asyncio.run(main())
    return 0


class Attacker:
    """One attack in its own process; its JSON lines are read by a thread."""

    def __init__(self, name: str, port: int, tls: Certificates, count: int,
                 timeout: float) -> None:
        self.events: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._done = threading.Event()
        self.process = harness.spawn(
            [sys.executable, __file__, "--attack", name, "--port", str(port),
             "--ca", tls.certificate, "--count", str(count), "--timeout", str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                self.events.append(event)
                if event.get("event") == "ready":
                    self._ready.set()
        self._ready.set()
        self._done.set()

    def event(self, name: str) -> dict[str, Any]:
        return next((e for e in self.events if e.get("event") == name), {})

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        self._ready.wait(timeout)
        return self.event("ready")

    def stop(self, timeout: float = 20.0) -> dict[str, Any]:
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        self._done.wait(timeout)
        harness.stop_process(self.process, 5)
        return {k: v for k, v in self.event("stats").items() if k != "event"}


# The bench.

def bridge_config(directory: Path, tls: Certificates, sink_port: int, hostile_port: int,
                  users: Path) -> Path:
    """The bridge of every scenario: the sink as the default route, and the hostile
    upstream as the route of one account that the attacker's sender maps to."""
    q = json.dumps
    secret = directory / "upstream-password"
    secret.write_text(harness.UPSTREAM_PASSWORD + "\n")
    secret.chmod(0o600)  # the bridge refuses secret files others may read
    upstream = f"""\
[upstream]
host = "127.0.0.1"
port = {sink_port}
ca_certificates = {q(tls.certificate)}

[upstream.hostile]
host = "127.0.0.1"
port = {hostile_port}
ca_certificates = {q(tls.certificate)}

[account.hostile]
username = {q(HOSTILE_USER)}
password_file = {q(str(secret))}
route = "hostile"

[credentials]
mapper = "per-sender"
username = {q(harness.UPSTREAM_USER)}
password_file = {q(str(secret))}
default = "default"

[credentials.map]
{q(ATTACKER)} = "hostile"
"""
    config = harness.bridge_config(directory, tls, sink_port, users=users, upstream=upstream)
    # The normal client (127.0.0.2) and the attackers that need no AUTH (127.0.0.1) are
    # trusted; the AUTH storm's addresses (127.1.0.1 onwards) are not, as on the Internet.
    config.write_text(config.read_text().replace('trusted_networks = ["127.0.0.0/8"]',
                                                 'trusted_networks = ["127.0.0.0/16"]'))
    return config


def normal_client(port: int, tls: Certificates, body: bytes, give_up: float) -> dict[str, Any]:
    """One message as a normal trusted client: seconds, or why it did not get through."""
    context = harness.client_context(tls)
    started = time.monotonic()
    try:
        seconds = asyncio.run(harness.submit(Target("normal", port), context, body, give_up,
                                             source=NORMAL_SOURCE))
    except harness.SMTPFailure as e:
        elapsed = time.monotonic() - started
        if str(e).startswith("no answer within"):
            return {"seconds": None, "outcome": f"blocked ({give_up:g} s)"}
        return {"seconds": None, "outcome": f"refused after {elapsed:.1f} s: {e}"}
    except Exception as e:
        elapsed = time.monotonic() - started
        return {"seconds": None, "outcome": f"failed after {elapsed:.1f} s: "
                                            f"{harness.describe(e)}"}
    return {"seconds": seconds, "outcome": f"{seconds:.2f} s"}


def scenario(args: argparse.Namespace, name: str, directory: Path, tls: Certificates,
             sink: Sink, hostile: Sink, users: Path) -> dict[str, Any]:
    run_dir = directory / name
    run_dir.mkdir()
    config = bridge_config(run_dir, tls, sink.port, hostile.port, users)
    body = harness.message()
    bridge = Bridge(config, run_dir)
    result: dict[str, Any] = {"scenario": name}
    try:
        port = bridge.ports["smtps"]
        result["quiet"] = normal_client(port, tls, body, args.give_up)
        time.sleep(0.5)
        result["rss_before_mib"] = bridge.rss() / MIB
        capped = threading.Event()

        def over_cap() -> None:
            capped.set()
            harness.stop_process(bridge.process, 0)

        count = {"idle-tls": args.idle_connections, "silent-tcp": args.silent_connections,
                 "auth-storm": args.storm_addresses}.get(name, 1)
        with MemoryMonitor(bridge.pid, limit=int(args.rss_cap * MIB),
                           on_limit=over_cap) as monitor:
            attacker = Attacker(name, port, tls, count, args.timeout)
            try:
                started = time.monotonic()
                ready = attacker.wait_ready(args.setup_timeout)
                result["setup_s"] = time.monotonic() - started
                result["attack"] = ready.get("detail", "not in place within "
                                             f"{args.setup_timeout:g} s")
                time.sleep(args.settle)
                result["rss_attack_mib"] = monitor.last / MIB
                result["normal"] = normal_client(port, tls, body, args.give_up)
                rest = args.duration - (time.monotonic() - started)
                if rest > 0 and not capped.is_set():
                    capped.wait(rest)
            finally:
                result["attack_stats"] = attacker.stop()
            result["rss_end_mib"] = monitor.last / MIB
        result["peak_rss_mib"] = max(monitor.peak, harness.peak_rss(bridge.pid)) / MIB
        result["capped"] = capped.is_set()
        result["bridge_alive"] = bridge.alive
        result["after"] = normal_client(port, tls, body, args.give_up) if bridge.alive \
            else {"seconds": None, "outcome": "bridge gone"}
        result["rss_after_mib"] = bridge.rss() / MIB if bridge.alive else None
    finally:
        bridge.stop()
    reasons = []
    if result["capped"]:
        reasons.append(f"RSS over {args.rss_cap:g} MiB, bridge stopped by the bench")
    elif result["peak_rss_mib"] >= RSS_TARGET_MIB:
        reasons.append(f"RSS {result['peak_rss_mib']:.0f} MiB")
    seconds = result["normal"]["seconds"]
    if seconds is None:
        reasons.append(f"normal client {result['normal']['outcome']}")
    elif seconds >= CLIENT_TARGET_S:
        reasons.append(f"normal client {seconds:.1f} s")
    if not result["bridge_alive"] and not result["capped"]:
        reasons.append("the bridge died")
    result["pass"] = not reasons
    result["reasons"] = reasons
    result["log_tail"] = bridge.log_text()[-3000:] if reasons else ""
    return result


def attack_summary(result: dict[str, Any]) -> str:
    stats = result.get("attack_stats") or {}
    name = result["scenario"]
    if name in ("idle-tls", "silent-tcp") and stats:
        return (f"{stats.get('open', 0)} open, "
                f"{stats.get('closed_by_bridge', 0)} closed by the bridge")
    if name == "pipelining" and stats:
        return f"{stats.get('sent_mib', 0):,.0f} MiB of EHLO sent"
    if name == "auth-storm" and stats:
        replies = ", ".join(f"{count} x {code}" for code, count in
                            sorted(stats.get("replies", {}).items()))
        return f"{stats.get('attempts', 0)} AUTH attempts ({replies or 'no replies'})"
    if name == "endless-reply" and stats:
        replies = "; ".join(f"{count} x {text}" for text, count in
                            stats.get("replies", {}).items())
        return f"attacker got: {replies or 'no reply'}"
    return result.get("attack", "")


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    print(f"\nnormal client: trusted, implicit TLS, one 1 KiB message, given up after "
          f"{args.give_up:g} s; targets: peak RSS < {RSS_TARGET_MIB:g} MiB, "
          f"client < {CLIENT_TARGET_S:g} s")
    rows = [["scenario", "RSS before", "peak RSS", "RSS after", "client quiet",
             "client under attack", "client after", "result"]]
    for r in results:
        peak = f"{r['peak_rss_mib']:,.1f} MiB" + (" (cap)" if r["capped"] else "")
        after = "-" if r.get("rss_after_mib") is None else f"{r['rss_after_mib']:,.1f} MiB"
        rows.append([r["scenario"], f"{r['rss_before_mib']:.1f} MiB", peak, after,
                     r["quiet"]["outcome"], r["normal"]["outcome"], r["after"]["outcome"],
                     "PASS" if r["pass"] else "FAIL: " + "; ".join(r["reasons"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for number, row in enumerate(rows):
        print("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if number == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print("\nthe attacks:")
    for r in results:
        errors = (r.get("attack_stats") or {}).get("errors") or {}
        extra = f"; their errors: {harness.errors_text(Counter(errors))}" if errors else ""
        print(f"  {r['scenario']}: {r.get('attack', '')} after {r.get('setup_s', 0):.1f} s; "
              f"{attack_summary(r)}{extra}")
    print(f"\nclient quiet: before the attack; under attack: {args.settle:g} s after it was "
          f"in place; after: once it stopped (every attack lasts at least {args.duration:g} s)."
          "\nRSS after: once the attack stopped and the client after got its answer.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)} (default all)")
    parser.add_argument("--idle-connections", type=int, default=3000)
    parser.add_argument("--silent-connections", type=int, default=1000)
    parser.add_argument("--storm-addresses", type=int, default=1000)
    parser.add_argument("--password-cost", type=int, default=15, metavar="LOG2_N",
                        help="scrypt cost of the local user's hash (default 15, production)")
    parser.add_argument("--give-up", type=float, default=30.0,
                        help="seconds after which the normal client counts as blocked")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds each attack lasts at least, from its start (default 30)")
    parser.add_argument("--setup-timeout", type=float, default=90.0,
                        help="seconds an attack may take to be in place (default 90)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds between the attack being in place and the normal client")
    parser.add_argument("--rss-cap", type=float, default=2048.0,
                        help="MiB at which the bench stops the bridge to protect the machine")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds an attacking client waits for one step (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    # Internal: run one attack in this process.
    parser.add_argument("--attack", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack:
        return run_attack(args)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    harness.interrupt_on_sigterm()
    limit = harness.raise_fd_limit()
    info = harness.machine()
    say = (lambda text: None) if args.json else (lambda text: print(text, flush=True))
    say(f"machine: {info['cpus']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"{info['openssl']} (bridge: {info['bridge_openssl']}), Twisted {info['twisted']}, "
        f"commit {info.get('commit', '?')}; "
        f"open files limit {limit}")
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="smtpbridge-hostile-") as temp, \
                contextlib.ExitStack() as stack:
            directory = Path(temp)
            tls = harness.make_certificates(directory)
            sink = Sink(tls)
            stack.callback(sink.stop)
            hostile = Sink(None, endless_reply=True)
            stack.callback(hostile.stop)
            users = harness.write_users(directory, args.password_cost)
            for name in names:
                say(f"scenario {name} ...")
                result = scenario(args, name, directory, tls, sink, hostile, users)
                results.append(result)
                say(f"  {result['attack']}; peak RSS {result['peak_rss_mib']:.1f} MiB; "
                    f"normal client {result['normal']['outcome']}; "
                    f"{'PASS' if result['pass'] else 'FAIL: ' + '; '.join(result['reasons'])}")
    except KeyboardInterrupt:
        print("interrupted; every process the bench started was stopped", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"machine": info, "results": results}))
    else:
        report(args, results)
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
