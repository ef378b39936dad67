"""``smtpbridge queue``: look at and act on the spool, safe while the bridge runs.

It works on the spool's files directly (the bridge holds a lock on a message while it
delivers it) and tells running bridges, with SIGUSR1, to retry at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from smtpbridge.errors import ConfigError
from smtpbridge.spool import Envelope, Spool

PROG = "smtpbridge: queue"


def add_command(commands: Any) -> None:
    """Register ``queue`` with the C{commands} of the ``smtpbridge`` parser."""
    parser = commands.add_parser(
        "queue", help="list, show, flush, delete, hold or release spooled messages",
        description="Act on the spool of the bridge the configuration describes.  Safe while "
        "the bridge runs.")
    parser.add_argument("--config", required=True, metavar="FILE", help="the TOML file")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="every message: id, age, size, attempts, sender, "
                                    "recipients, last error")
    for name, text in (("show", "one message: its envelope and header section"),
                       ("delete", "remove a message for good"),
                       ("hold", "keep a message from being delivered"),
                       ("release", "deliver a held message again (at once)")):
        actions.add_parser(name, help=text).add_argument("id")
    flush = actions.add_parser("flush", help="try every message (or one) now")
    flush.add_argument("id", nargs="?")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from smtpbridge.config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"smtpbridge: {e}", file=sys.stderr)
        return 1
    spool = Spool(config.spool.directory, config.spool.max_size)
    if not os.path.isdir(os.path.join(spool.directory, "queue")):
        print(f"{PROG}: no spool at {spool.directory} (the bridge creates it when it starts)",
              file=sys.stderr)
        return 1
    action = {"list": _list, "show": _show, "flush": _flush, "delete": _delete,
              "hold": _hold, "release": _release}[args.action]
    code: int = action(spool, args)
    return code


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _list(spool: Spool, args: argparse.Namespace) -> int:
    now = time.time()
    envelopes = list(spool.envelopes())
    print(f"{'id':<16} {'age':>5} {'size':>9} {'tries':>5}  sender -> recipients")
    for envelope in envelopes:
        held = " (held)" if spool.held(envelope.id) else ""
        print(f"{envelope.id:<16} {_age(now - envelope.created):>5} {envelope.size:>9} "
              f"{envelope.attempts:>5}  <{envelope.sender}> -> "
              f"{', '.join(f'<{r}>' for r in envelope.recipients)}{held}")
        if envelope.last_error:
            print(f"{'':<16} last error: {envelope.last_error}")
    print(f"{len(envelopes)} message(s), {sum(e.size for e in envelopes)} bytes")
    return 0


def _find(spool: Spool, message_id: str) -> Envelope | None:
    envelope = spool.load(message_id)
    if envelope is None:
        print(f"{PROG}: no message {message_id}", file=sys.stderr)
    return envelope


def _show(spool: Spool, args: argparse.Namespace) -> int:
    envelope = _find(spool, args.id)
    if envelope is None:
        return 1
    print(envelope.to_json())
    print()
    with open(spool.path(envelope.id), "rb") as f:
        for line in f.read(64 * 1024).split(b"\r\n"):
            if not line:
                break
            print(line.decode("utf-8", "replace"))
    return 0


def _signal(spool: Spool) -> int:
    """SIGUSR1 to every running bridge of this spool; how many got it."""
    told = 0
    for pid in spool.runners():
        try:
            os.kill(pid, signal.SIGUSR1)
            told += 1
        except ProcessLookupError:
            spool.unregister(pid)  # a bridge that died without unregistering
        except PermissionError:
            print(f"{PROG}: not allowed to signal process {pid} (run as the bridge's user)",
                  file=sys.stderr)
    return told


def _flush(spool: Spool, args: argparse.Namespace) -> int:
    if args.id is not None and _find(spool, args.id) is None:
        return 1
    spool.request_flush(args.id or "all")
    told = _signal(spool)
    print(f"flush requested for {args.id or 'every message'}; " + (
        f"{told} running bridge(s) told" if told else "no bridge running: it is tried "
                                                       "when the bridge starts"))
    return 0


def _delete(spool: Spool, args: argparse.Namespace) -> int:
    if _find(spool, args.id) is None:
        return 1
    with spool.locked(args.id) as data:
        if data is None:
            print(f"{PROG}: {args.id} is being delivered right now; try again",
                  file=sys.stderr)
            return 1
        spool.remove(args.id)
    print(f"{args.id} deleted")
    return 0


def _hold(spool: Spool, args: argparse.Namespace) -> int:
    if _find(spool, args.id) is None:
        return 1
    spool.hold(args.id)
    print(f"{args.id} held")
    return 0


def _release(spool: Spool, args: argparse.Namespace) -> int:
    if _find(spool, args.id) is None:
        return 1
    spool.hold(args.id, on=False)
    spool.request_flush(args.id)
    _signal(spool)
    print(f"{args.id} released")
    return 0
