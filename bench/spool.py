"""What the spool costs, and how fast it takes mail when the upstream is down.

Two comparisons, each in one run with interleaved rounds and medians, the same
certificate and load generator for everything (1 KiB messages, a new implicit-TLS
connection per message, no AUTH: the client is in trusted_networks):

- healthy upstream (the fast sink): the bridge with ``[spool] mode = "never"`` (in-line
  only) against ``mode = "fallback"`` (in-line, the body also written to a spool file
  and dropped after the upstream's 250).  Target: fallback costs at most 10% of the
  in-line throughput (50 concurrent clients) and latency (one client, p50).
- upstream down (nothing listens on its port): the bridge in ``fallback`` mode, which
  spools every message (fsync, then 250 queued), against Postfix as a relay with its
  relayhost down (it queues every message).  Target: the bridge accepts at least
  Postfix's rate.  Postfix runs an smtpd process per connection on every core, so the
  bridge is measured twice: with one process, and with ``[server] workers`` = the
  machine's cores (``--workers``); the target is for the latter.  For each, the CPU it
  used per accepted message (with every process below it), the whole machine's, and how
  many cores were busy: whether a rate is bound by CPU or by waiting.

    .venv/bin/python bench/spool.py [--rounds 3] [--messages 200] [--no-postfix] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness
from harness import Bridge, Postfix, Sink, Target


def bridge(directory: Path, tls: harness.Certificates, upstream_port: int, mode: str,
           name: str, workers: int | None = None) -> Bridge:
    """A bridge relaying to C{upstream_port} with the spool in C{mode}."""
    home = directory / name
    home.mkdir()
    q = json.dumps
    secret = home / "upstream-password"
    secret.write_text(harness.UPSTREAM_PASSWORD + "\n")
    secret.chmod(0o600)
    upstream = f"""\
[upstream]
host = "127.0.0.1"
port = {upstream_port}
ca_certificates = {q(tls.certificate)}
timeout = 10

[credentials]
mapper = "static"
username = {q(harness.UPSTREAM_USER)}
password_file = {q(str(secret))}

[spool]
mode = {q(mode)}
directory = {q(str(home / "spool"))}
first_retry = 3600
"""
    previous = os.umask(0o077)  # the bridge refuses secret files others may read
    try:
        config = harness.bridge_config(home, tls, upstream_port, upstream=upstream,
                                       workers=workers)
    finally:
        os.umask(previous)
    # Every load client comes from 127.0.0.1: lift the per-address limit (50).
    config.write_text(config.read_text().replace(
        'hostname = "localhost"\n',
        'hostname = "localhost"\nmax_connections_per_client = 10000\n', 1))
    return Bridge(config, home)


def measure(target: Target, context: Any, body: bytes, count: int,
            concurrency: int, quiet: bool = True) -> harness.LoadResult:
    if quiet:
        harness.wait_for_quiet(0.25, 30.0)
    return asyncio.run(harness.load(target, context, body, count, concurrency))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200, help="per single-client round")
    parser.add_argument("--concurrent-messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="[server] workers of the second upstream-down bridge")
    parser.add_argument("--no-postfix", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    harness.raise_fd_limit()
    body = harness.message(1024)
    figures: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        figures.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory(prefix="bench-spool-") as temporary, \
            contextlib.ExitStack() as stack:
        directory = Path(temporary)
        tls = harness.make_certificates(directory)
        context = harness.client_context(tls)
        sink = Sink(tls)
        stack.callback(sink.stop)
        down = harness.free_port()  # nothing listens here
        bridges = {}
        for name, port, mode, workers in (("never", sink.port, "never", None),
                                          ("fallback", sink.port, "fallback", None),
                                          ("down", down, "fallback", None),
                                          ("down-workers", down, "fallback", args.workers)):
            bridges[name] = bridge(directory, tls, port, mode, name, workers)
            stack.callback(bridges[name].stop)
        postfix = None
        if not args.no_postfix and harness.postfix_command() is not None:
            pf_dir = directory / "postfix"
            pf_dir.mkdir()
            postfix = Postfix(pf_dir, tls, down)
            stack.callback(postfix.stop)
        targets = {name: Target(name, b.ports["smtps"]) for name, b in bridges.items()}
        pids = {name: b.pid for name, b in bridges.items()}
        if postfix is not None:
            targets["postfix-down"] = Target("postfix-down", postfix.port)
            pids["postfix-down"] = postfix.master_pid() or 0
        for target in targets.values():  # warm up: TLS, imports, first upstream session
            measure(target, context, body, 20, 5)
        for number in range(args.rounds):
            order = ["never", "fallback"] if number % 2 == 0 else ["fallback", "never"]
            for name in order:
                single = measure(targets[name], context, body, args.messages, 1)
                note(f"{name} p50", single.percentile(50) * 1000)
                many = measure(targets[name], context, body, args.concurrent_messages,
                               args.concurrency)
                note(f"{name} msg/s", many.rate)
                note(f"{name} errors", float(sum(many.errors.values())))
            down_order = ["down", "down-workers", "postfix-down"]
            if number % 2:
                down_order.reverse()
            for name in down_order:
                if name not in targets:
                    continue
                harness.wait_for_quiet(0.25, 30.0)
                before = harness.cpu_snapshot(pids[name])
                many = measure(targets[name], context, body, args.concurrent_messages,
                               args.concurrency, quiet=False)
                used = {k: v - before[k] for k, v in harness.cpu_snapshot(pids[name]).items()}
                note(f"{name} msg/s", many.rate)
                note(f"{name} errors", float(sum(many.errors.values())))
                per = 1000 / many.accepted if many.accepted else float("nan")
                note(f"{name} own CPU ms/msg", used["relay"] * per)
                note(f"{name} machine CPU ms/msg", used["machine"] * per)
                note(f"{name} busy cores", used["machine"] / many.elapsed)
        # With workers, each keeps its messages in spool/worker-K/queue.
        queued = sum(len(list((directory / name / "spool").glob("**/queue/*.msg")))
                     for name in ("down", "down-workers"))

    result = {key: median(values) for key, values in figures.items()}
    result["spooled while down"] = float(queued)
    checks = [
        ("fallback / never, 50 concurrent msg/s", result["fallback msg/s"]
         / result["never msg/s"], 0.9, ">="),
        ("fallback / never, single-client p50", result["fallback p50"]
         / result["never p50"], 1.1, "<="),
    ]
    if "postfix-down msg/s" in result:
        checks.append((f"upstream down: bridge ({args.workers} workers) / Postfix accept rate",
                       result["down-workers msg/s"] / result["postfix-down msg/s"], 1.0, ">="))
        print(f"upstream down: bridge (1 process) / Postfix accept rate: "
              f"{result['down msg/s'] / result['postfix-down msg/s']:.2f}", file=sys.stderr)
    if args.json:
        print(json.dumps({"figures": figures, "medians": result,
                          "checks": [list(c) for c in checks]}, indent=1))
        return 0
    print(f"machine: {harness.machine()}")
    for key, value in result.items():
        print(f"{key:<32} {value:9.1f}   rounds: "
              + " ".join(f"{v:.1f}" for v in figures.get(key, [value])))
    failed = 0
    for text, value, limit, sense in checks:
        ok = value >= limit if sense == ">=" else value <= limit
        failed += not ok
        print(f"{text:<48} {value:6.2f}  target {sense} {limit}: {'PASS' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
