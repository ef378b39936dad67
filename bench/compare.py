"""Side by side: direct submission to a fast sink, the bridge, and Postfix as a relay.

One run, interleaved rounds, medians, the same certificate and the same load
generator for everything, ratios printed against the targets:

- direct: the load generator submits straight to the sink (STARTTLS, AUTH
  PLAIN, as the sink requires): the limit.
- bridge: implicit TLS to the bridge (twistd, in-line relay), no AUTH (the
  client is in trusted_networks); the bridge submits to the sink with STARTTLS,
  a verified certificate and AUTH, while the client waits.
- postfix: implicit TLS to a private Postfix instance (smtpd in wrapper mode,
  127.0.0.0/8 in mynetworks), which queues the message and relays it to the sink
  (relayhost, smtp_tls_security_level = secure, static SASL login).

Modes: single (one client, p50/p99), auth (AUTH LOGIN per message against the
bridge, versus no AUTH), concurrent (msg/s with 50 clients; the bridge with
``[server] workers = 2`` too, when it has that setting) and idle (the bridge's
RSS with 1,000 idle TLS sessions).  Every message is 1 KiB on a new connection.

    .venv/bin/python bench/compare.py [--rounds 3] [--modes single,concurrent] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from harness import MIB, Bridge, BridgeStartError, Postfix, Sink, Target

MODES = ("single", "auth", "concurrent", "idle")
#: The bridge's connection limits, per listener and per client address: every client of
#: the load generator comes from 127.0.0.1, as no real device population does (Postfix
#: exempts $mynetworks from its per-client limits by default).
CONNECTIONS = 5000

# The targets of the issue, as (key, text, limit, "<=" or ">=").
SINGLE_P50 = ("single_p50", "single-client p50, bridge / direct", 1.5, "<=")
CONC_DIRECT = ("concurrent_direct", "50 concurrent, 1 worker / direct", 0.5, ">=")
CONC_POSTFIX = ("concurrent_postfix", "50 concurrent, 1 worker / Postfix", 1.5, ">=")
CONC2_POSTFIX = ("concurrent2_postfix", "50 concurrent, 2 workers / Postfix", 2.0, ">=")
AUTH_RATIO = ("auth", "AUTH LOGIN per message / no AUTH (p50)", 1.2, "<=")
IDLE_RSS = ("idle_rss", "RSS with 1,000 idle TLS sessions, MiB", 100.0, "<=")
WORKERS = ("workers", "50 concurrent, 2 workers / 1 worker", 1.8, ">=")


class Run:
    """The processes of one comparison and what they measured."""

    def __init__(self, args: argparse.Namespace, directory: Path,
                 stack: contextlib.ExitStack) -> None:
        self.args = args
        self.directory = directory
        self.stack = stack
        self.notes: list[str] = []
        self.tls = harness.make_certificates(directory)
        self.context = harness.client_context(self.tls)
        self.body = harness.message(args.size)
        self.sink = Sink(self.tls)
        stack.callback(self.sink.stop)
        self.users = harness.write_users(directory, args.password_cost)
        self.targets: dict[str, Target] = {
            "direct": Target("direct", self.sink.port, "starttls", "plain",
                             harness.UPSTREAM_USER, harness.UPSTREAM_PASSWORD),
        }
        self.bridge = self.start_bridge("bridge")
        self.targets["bridge"] = Target("bridge", self.bridge.ports["smtps"])
        self.targets["bridge-auth"] = Target("bridge, AUTH LOGIN", self.bridge.ports["smtps"],
                                             auth="login")
        self.bridge2: Bridge | None = None
        if "concurrent" in args.modes:
            try:
                self.bridge2 = self.start_bridge("bridge-2", workers=2)
            except BridgeStartError as e:
                self.notes.append(f"bridge with workers = 2 skipped: it does not start: {e}")
            else:
                self.targets["bridge-2"] = Target("bridge, 2 workers",
                                                  self.bridge2.ports["smtps"])
        self.postfix: Postfix | None = None
        if args.no_postfix:
            self.notes.append("Postfix skipped (--no-postfix)")
        elif harness.postfix_command() is None:
            self.notes.append(harness.POSTFIX_INSTALL)
        else:
            self.postfix = Postfix(directory / "postfix", self.tls, self.sink.port,
                                   concurrency=args.concurrency)
            stack.callback(self.postfix.stop)
            self.targets["postfix"] = Target("postfix", self.postfix.port)
        self.delivered = 0  # messages the sink should have by now
        self.disturbed = 0  # measurements started while the machine was busy anyway

    def start_bridge(self, name: str, workers: int | None = None) -> Bridge:
        directory = self.directory / name
        directory.mkdir()
        config = harness.bridge_config(directory, self.tls, self.sink.port, users=self.users,
                                       connections=CONNECTIONS,
                                       workers=workers)
        bridge = Bridge(config, directory)
        self.stack.callback(bridge.stop)
        return bridge

    def relay_pid(self, target: Target) -> int | None:
        """The process (tree) that relays for C{target}; None for direct submission."""
        for bridge in (self.bridge, self.bridge2):
            if bridge is not None and target.port == bridge.ports["smtps"]:
                return bridge.pid
        if self.postfix is not None and target.port == self.postfix.port:
            return self.postfix.master_pid()
        return None

    def quiet(self) -> None:
        """Wait a while for other processes on the machine to calm down."""
        if self.args.quiet_wait <= 0:
            return
        waited, cores = harness.wait_for_quiet(self.args.quiet_cores, self.args.quiet_wait)
        if cores >= self.args.quiet_cores:
            self.disturbed += 1

    def load(self, target: Target, count: int, concurrency: int) -> dict[str, Any]:
        """Send C{count} messages; latencies, rate, errors, CPU, and when the sink had all."""
        self.quiet()
        relay = self.relay_pid(target)
        before = harness.cpu_snapshot(relay, self.sink.pid)
        result = asyncio.run(harness.load(target, self.context, self.body, count, concurrency,
                                          self.args.timeout))
        self.delivered += result.accepted
        drained = self.sink.wait_for(self.delivered, self.args.drain_timeout)
        after = harness.cpu_snapshot(relay, self.sink.pid)
        if drained is None:
            self.delivered = self.sink.messages
        used = {key: after[key] - before[key] for key in after}
        other = used["machine"] - used["bench"] - used["sink"] - used["relay"]
        wall = result.elapsed + (drained or 0.0)
        per = 1000 / result.accepted if result.accepted else float("nan")
        return {
            "sent": count,
            "accepted": result.accepted,
            "errors": dict(result.errors),
            "seconds": result.elapsed,
            "rate": result.rate,
            "p50_ms": result.percentile(50) * 1000,
            "p99_ms": result.percentile(99) * 1000,
            "sink_seconds": None if drained is None else result.elapsed + drained,
            "delivered_rate": (result.accepted / (result.elapsed + drained)
                               if drained is not None and result.accepted else 0.0),
            "relay_cpu_ms": used["relay"] * per,
            "bench_cpu_ms": used["bench"] * per,
            "sink_cpu_ms": used["sink"] * per,
            "other_cores": other / wall if wall else float("nan"),
        }

    def warm_up(self, names: list[str]) -> None:
        for name in names:
            self.load(self.targets[name], self.args.warm_up, min(self.args.concurrency,
                                                                 self.args.warm_up))

    def idle(self) -> dict[str, Any]:
        """A fresh bridge: RSS after a warm-up, then with the idle sessions open."""
        self.quiet()
        directory = Path(tempfile.mkdtemp(dir=self.directory, prefix="idle-"))
        config = harness.bridge_config(directory, self.tls, self.sink.port, users=self.users,
                                       connections=CONNECTIONS)
        bridge = Bridge(config, directory)
        try:
            target = Target("bridge", bridge.ports["smtps"])
            warm = asyncio.run(harness.load(target, self.context, self.body, 5, 1))
            self.delivered += warm.accepted
            time.sleep(self.args.settle)
            before = bridge.rss()

            async def hold() -> tuple[int, dict[str, int], int]:
                sessions, errors = await harness.open_idle(
                    target, self.context, self.args.idle_sessions, timeout=self.args.timeout)
                try:
                    await asyncio.sleep(self.args.settle)
                    return len(sessions), dict(errors), bridge.rss()
                finally:
                    harness.abort_all(sessions)

            opened, errors, during = asyncio.run(hold())
        finally:
            bridge.stop()
        return {
            "sessions": opened,
            "errors": errors,
            "rss_before_mib": before / MIB,
            "rss_mib": during / MIB,
            "per_session_kib": (during - before) / 1024 / opened if opened else float("nan"),
        }


def rotate(names: list[str], by: int) -> list[str]:
    by %= len(names) or 1
    return names[by:] + names[:by]


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    return harness.median([r[key] for r in rounds if r.get(key) is not None])


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def each(rounds: list[dict[str, Any]], key: str, digits: int = 1) -> str:
    """The value of every round, in order."""
    if len(rounds) < 2:
        return ""
    return " ".join(fmt(r.get(key), digits) for r in rounds)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        last = len(row) - 1
        cells = [cell.ljust(widths[i]) if i in (0, last) else cell.rjust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  " + "  ".join(cells).rstrip())
        if number == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def errors_of(rounds: list[dict[str, Any]]) -> str:
    total: dict[str, int] = {}
    for r in rounds:
        for text, count in r.get("errors", {}).items():
            total[text] = total.get(text, 0) + count
    return "; ".join(f"{count}x {text}" for text, count in
                     sorted(total.items(), key=lambda item: -item[1])[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; figures are their medians (default 3)")
    parser.add_argument("--messages", type=int, default=200,
                        help="messages per round and target in single and auth (default 200)")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="clients in the concurrent mode (default 50)")
    parser.add_argument("--concurrent-messages", type=int, default=2000,
                        help="messages per round and target in concurrent (default 2000)")
    parser.add_argument("--idle-sessions", type=int, default=1000,
                        help="idle TLS sessions in the idle mode (default 1000)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {', '.join(MODES)} (default all)")
    parser.add_argument("--size", type=int, default=1024, help="message size (default 1024)")
    parser.add_argument("--password-cost", type=int, default=15, metavar="LOG2_N",
                        help="scrypt cost of the local user's hash (default 15, the "
                             "production default of smtpbridge hash-password)")
    parser.add_argument("--warm-up", type=int, default=100,
                        help="messages to each target before the first round (default 100)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds a client waits for one message (default 30)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for the sink to receive every accepted message")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait before reading RSS (default 1)")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="before each measurement, wait up to this many seconds for "
                             "other processes to use less than --quiet-cores (default 60)")
    parser.add_argument("--quiet-cores", type=float, default=0.25,
                        help="CPU cores other processes may use when a measurement starts")
    parser.add_argument("--no-postfix", action="store_true", help="leave Postfix out")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")

    harness.interrupt_on_sigterm()
    limit = harness.raise_fd_limit()
    info = harness.machine()
    say: Callable[[str], None] = (lambda text: None) if args.json else \
        (lambda text: print(text, flush=True))
    say(f"machine: {info['cpus']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}, {info['openssl']} (bridge: {info['bridge_openssl']}), "
        f"Twisted {info['twisted']}, "
        f"Postfix {info['postfix']}, commit {info.get('commit', '?')}")
    say(f"{args.rounds} rounds, {args.size}-octet messages, one connection per message, "
        f"open files limit {limit}")

    results: dict[str, dict[str, list[dict[str, Any]]]] = {m: {} for m in args.modes}
    try:
        with tempfile.TemporaryDirectory(prefix="smtpbridge-compare-") as temp, \
                contextlib.ExitStack() as stack:
            run = Run(args, Path(temp), stack)
            for note in run.notes:
                say(f"note: {note}")
            relays = [name for name in ("direct", "bridge", "bridge-2", "postfix")
                      if name in run.targets]
            say(f"warm-up: {args.warm_up} messages to each of {', '.join(relays)}")
            run.warm_up(relays + (["bridge-auth"] if "auth" in args.modes else []))
            for number in range(args.rounds):
                for mode in args.modes:
                    say(f"round {number + 1}/{args.rounds}: {mode}")
                    measure(run, mode, number, results[mode])
            notes = run.notes
            if run.disturbed:
                notes.append(f"{run.disturbed} measurement(s) started while other processes "
                             f"used {args.quiet_cores:g} cores or more after waiting "
                             f"{args.quiet_wait:g} s")
            others = [r["other_cores"] for by_target in results.values()
                      for rounds in by_target.values() for r in rounds if "other_cores" in r]
            if others and max(others) >= 0.1:
                notes.append(f"other processes on the machine used {harness.median(others):.2f}"
                             f" cores (median; at most {max(others):.2f}) while the figures "
                             "were measured")
    except KeyboardInterrupt:
        print("interrupted; every process the bench started was stopped", file=sys.stderr)
        return 130

    checks = check_targets(results, args)
    if args.json:
        print(json.dumps({"machine": info, "settings": {
            "rounds": args.rounds, "messages": args.messages, "size": args.size,
            "concurrency": args.concurrency, "concurrent_messages": args.concurrent_messages,
            "idle_sessions": args.idle_sessions, "password_cost": args.password_cost},
            "notes": notes, "results": results, "summary": summary(results),
            "targets": checks}))
    else:
        report(args, results, checks, notes)
    measured = [c for c in checks if c["pass"] is not None]
    return 0 if measured and all(c["pass"] for c in measured) else 1


def measure(run: Run, mode: str, number: int, into: dict[str, list[dict[str, Any]]]) -> None:
    args = run.args
    if mode == "single":
        names = [n for n in ("direct", "bridge", "postfix") if n in run.targets]
        for name in rotate(names, number):
            into.setdefault(name, []).append(run.load(run.targets[name], args.messages, 1))
    elif mode == "auth":
        for name in rotate(["bridge", "bridge-auth"], number):
            into.setdefault(name, []).append(run.load(run.targets[name], args.messages, 1))
    elif mode == "concurrent":
        names = [n for n in ("direct", "bridge", "bridge-2", "postfix") if n in run.targets]
        for name in rotate(names, number):
            into.setdefault(name, []).append(
                run.load(run.targets[name], args.concurrent_messages, args.concurrency))
    elif mode == "idle":
        into.setdefault("bridge", []).append(run.idle())


SUMMARY_KEYS = ("p50_ms", "p99_ms", "rate", "delivered_rate", "sink_seconds", "relay_cpu_ms",
                "bench_cpu_ms", "sink_cpu_ms", "other_cores", "rss_before_mib", "rss_mib",
                "per_session_kib", "sessions")


def summary(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    return {mode: {name: {key: median_of(rounds, key) for key in SUMMARY_KEYS
                          if any(key in r for r in rounds)}
                   for name, rounds in by_target.items()}
            for mode, by_target in results.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a != a or b != b or not b:
        return None
    return a / b


def check_targets(results: dict[str, dict[str, list[dict[str, Any]]]],
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each target of the issue with its measured value; pass None when not measured (or
    not measured under the target's conditions: 50 clients, 1,000 idle sessions)."""
    medians = summary(results)

    def get(mode: str, name: str, key: str) -> float | None:
        return medians.get(mode, {}).get(name, {}).get(key)

    values = {
        SINGLE_P50: ratio(get("single", "bridge", "p50_ms"), get("single", "direct", "p50_ms")),
        CONC_DIRECT: ratio(get("concurrent", "bridge", "rate"),
                           get("concurrent", "direct", "rate")),
        CONC_POSTFIX: ratio(get("concurrent", "bridge", "rate"),
                            get("concurrent", "postfix", "rate")),
        CONC2_POSTFIX: ratio(get("concurrent", "bridge-2", "rate"),
                             get("concurrent", "postfix", "rate")),
        AUTH_RATIO: ratio(get("auth", "bridge-auth", "p50_ms"), get("auth", "bridge", "p50_ms")),
        IDLE_RSS: get("idle", "bridge", "rss_mib"),
        WORKERS: ratio(get("concurrent", "bridge-2", "rate"), get("concurrent", "bridge", "rate")),
    }
    def missing(mode: str, *names: str) -> str:
        if mode not in results:
            return f"not measured (mode {mode} not run)"
        absent = [n for n in names if n not in results[mode]]
        if "bridge-2" in absent:
            return "skipped: the bridge has no [server] workers"
        if "postfix" in absent:
            return "skipped: no Postfix"
        return "not measured"

    needs = {SINGLE_P50: ("single",), CONC_DIRECT: ("concurrent",),
             CONC_POSTFIX: ("concurrent", "postfix"),
             CONC2_POSTFIX: ("concurrent", "bridge-2", "postfix"), AUTH_RATIO: ("auth",),
             IDLE_RSS: ("idle",), WORKERS: ("concurrent", "bridge-2")}
    checks = []
    for target, value in values.items():
        key, text, limit, sense = target
        passed = None if value is None else (value <= limit if sense == "<=" else value >= limit)
        check = {"target": key, "text": text, "limit": limit, "sense": sense,
                 "value": value, "pass": passed}
        if passed is None:
            check["note"] = missing(*needs[target])
        elif target == IDLE_RSS and args.idle_sessions != 1000:
            check["pass"] = None
            check["note"] = f"measured with {args.idle_sessions} sessions, not 1,000"
        elif "concurrent" in key and args.concurrency != 50:
            check["pass"] = None
            check["note"] = f"measured with {args.concurrency} clients, not 50"
        checks.append(check)
    checks.append({"target": "relay_memory", "text": "relaying 50 MiB, RSS growth",
                   "limit": 16.0, "sense": "<=", "value": None, "pass": None,
                   "note": "measured by bench/relay_memory.py"})
    return checks


LABELS = {"direct": "direct (sink)", "bridge": "bridge", "bridge-2": "bridge, 2 workers",
          "postfix": "postfix", "bridge-auth": "bridge, AUTH LOGIN"}


def report(args: argparse.Namespace, results: dict[str, dict[str, list[dict[str, Any]]]],
           checks: list[dict[str, Any]], notes: list[str]) -> None:
    medians = summary(results)
    rounds = f"median of {args.rounds} round{'s' if args.rounds != 1 else ''}"
    if "single" in results:
        direct = medians["single"].get("direct", {})
        rows = [["single client", "p50 ms", "p99 ms", "p50 x direct", "p99 x direct",
                 "p50 each round", "errors"]]
        for name, rs in results["single"].items():
            m = medians["single"][name]
            rows.append([LABELS[name], fmt(m["p50_ms"], 2), fmt(m["p99_ms"], 2),
                         fmt(ratio(m["p50_ms"], direct.get("p50_ms")), 2),
                         fmt(ratio(m["p99_ms"], direct.get("p99_ms")), 2),
                         each(rs, "p50_ms", 2), errors_of(rs) or "0"])
        print(f"\nsingle: one client, {args.messages} messages per round, {rounds}")
        print(table(rows))
    if "auth" in results:
        plain = medians["auth"].get("bridge", {})
        rows = [["bridge, one client", "p50 ms", "p99 ms", "p50 x no AUTH", "p50 each round",
                 "errors"]]
        for name, rs in results["auth"].items():
            m = medians["auth"][name]
            label = "no AUTH (trusted network)" if name == "bridge" else \
                f"AUTH LOGIN (scrypt 2^{args.password_cost})"
            rows.append([label, fmt(m["p50_ms"], 2), fmt(m["p99_ms"], 2),
                         fmt(ratio(m["p50_ms"], plain.get("p50_ms")), 2),
                         each(rs, "p50_ms", 2), errors_of(rs) or "0"])
        print(f"\nauth: one client, {args.messages} messages per round, each on a new "
              f"connection, {rounds}")
        print(table(rows))
    if "concurrent" in results:
        m_all = medians["concurrent"]
        direct = m_all.get("direct", {}).get("rate")
        postfix = m_all.get("postfix", {}).get("rate")
        rows = [[f"{args.concurrency} clients", "msg/s", "x direct", "x postfix", "each round",
                 "p50 ms", "p99 ms", "sink has all", "relay CPU ms/msg", "other cores",
                 "errors"]]
        for name, rs in results["concurrent"].items():
            m = m_all[name]
            rows.append([LABELS[name], fmt(m["rate"]), fmt(ratio(m["rate"], direct), 2),
                         fmt(ratio(m["rate"], postfix), 2), each(rs, "rate", 0),
                         fmt(m["p50_ms"]), fmt(m["p99_ms"]),
                         f"{fmt(m.get('sink_seconds'))} s", fmt(m["relay_cpu_ms"], 2),
                         fmt(m["other_cores"], 2), errors_of(rs) or "0"])
        print(f"\nconcurrent: {args.concurrent_messages} messages per round, {rounds}; "
              "msg/s = accepted by the target per second; sink has all = seconds from the "
              "first connection until the sink had received every accepted message; relay "
              "CPU = the bridge's or Postfix's processes; other cores = what the rest of the "
              "machine used meanwhile")
        print(table(rows))
        cpu = [f"{LABELS[n]} {fmt(m_all[n]['bench_cpu_ms'], 2)}/{fmt(m_all[n]['sink_cpu_ms'], 2)}"
               for n in results["concurrent"]]
        print("  load generator / sink CPU ms per message: " + ", ".join(cpu))
    if "idle" in results:
        rs = results["idle"]["bridge"]
        m = medians["idle"]["bridge"]
        print(f"\nidle: the bridge's RSS with {args.idle_sessions} idle implicit-TLS sessions "
              f"(handshake done, greeting read), a fresh bridge each round, {rounds}")
        rows = [["bridge", "sessions", "RSS before MiB", "RSS with sessions MiB",
                 "KiB per session", "each round", "errors"]]
        rows.append(["workers = 1", fmt(m["sessions"], 0), fmt(m["rss_before_mib"]),
                     fmt(m["rss_mib"]), fmt(m["per_session_kib"]), each(rs, "rss_mib"),
                     errors_of(rs) or "0"])
        print(table(rows))
    for note in notes:
        print(f"note: {note}")
    print("\ntargets")
    rows = [["target", "limit", "measured", "result"]]
    for c in checks:
        limit = f"{c['sense']} {c['limit']:g}"
        if c["pass"] is None:
            measured = "-" if c["value"] is None else fmt(c["value"], 2)
            verdict = c.get("note", "not measured")
        else:
            measured = fmt(c["value"], 2)
            verdict = "PASS" if c["pass"] else "FAIL"
        rows.append([c["text"], limit, measured, verdict])
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
