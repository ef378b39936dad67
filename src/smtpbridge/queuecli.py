"""``smtpbridge queue``: look at and act on the spool, safe while the bridge runs.

It works on the spool's files directly (the bridge holds a lock on a message while it
delivers it) and tells running bridges, with SIGUSR1, to retry at once.  With workers,
each has a spool of its own under the configured directory: the command acts on them all.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from typing import Any

from smtpbridge.errors import ConfigError
from smtpbridge.model import Envelope
from smtpbridge.spool import Spool
from smtpbridge.spooldirs import spool_directories

PROG = "smtpbridge: queue"
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def queue_id(text: str) -> str:
    """A queue id as the bridge makes them (16 hex digits), never a path."""
    if not re.fullmatch(r"[0-9A-Fa-f]{16}", text):
        raise argparse.ArgumentTypeError(f"not a queue id (16 hex digits): {text!r}")
    return text.upper()


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
        actions.add_parser(name, help=text).add_argument("id", type=queue_id)
    flush = actions.add_parser("flush", help="try every message (or one) now")
    flush.add_argument("id", nargs="?", type=queue_id)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from smtpbridge.config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"smtpbridge: {e}", file=sys.stderr)
        return 1
    directory = config.spool.directory
    spools = [Spool(path, config.spool.max_size) for path in spool_directories(directory)]
    if not spools:
        print(f"{PROG}: no spool at {directory} (the bridge creates it when it starts)",
              file=sys.stderr)
        return 1
    action = {"list": _list, "show": _show, "flush": _flush, "delete": _delete,
              "hold": _hold, "release": _release}[args.action]
    try:
        code: int = action(spools, args)
    except OSError as e:  # (run as a user who may not read the spool, most often)
        print(f"{PROG}: {e.filename or directory}: {e.strerror or e}", file=sys.stderr)
        return 1
    return code


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _list(spools: list[Spool], args: argparse.Namespace) -> int:
    now = time.time()
    unreadable: list[str] = []
    envelopes = sorted(((envelope, spool) for spool in spools
                        for envelope in spool.envelopes(unreadable)), key=lambda pair: pair[0].id)
    for problem in unreadable:
        print(f"{PROG}: message {problem}", file=sys.stderr)
    print(f"{'id':<16} {'age':>5} {'size':>9} {'tries':>5}  sender -> recipients")
    for envelope, spool in envelopes:
        held = " (held)" if spool.held(envelope.id) else ""
        print(printable(f"{envelope.id:<16} {_age(now - envelope.created):>5} "
                        f"{envelope.size:>9} {envelope.attempts:>5}  <{envelope.sender}> -> "
                        f"{', '.join(f'<{r}>' for r in envelope.recipients)}{held}"))
        if envelope.last_error:  # (an upstream's words)
            print(printable(f"{'':<16} last error: {envelope.last_error}"))
    print(f"{len(envelopes)} message(s), {sum(e.size for e, _ in envelopes)} bytes")
    return 0


def _find(spools: list[Spool], message_id: str) -> tuple[Envelope, Spool] | None:
    """The message C{message_id} and the spool that holds it; None (and said so) when
    no spool does."""
    for spool in spools:
        try:
            envelope = spool.load(message_id)
        except ValueError as e:  # (its files are for the administrator to look at)
            print(f"{PROG}: message {message_id} cannot be read: {e}", file=sys.stderr)
            return None
        if envelope is not None:
            return envelope, spool
    print(f"{PROG}: no message {message_id}", file=sys.stderr)
    return None


def _show(spools: list[Spool], args: argparse.Namespace) -> int:
    found = _find(spools, args.id)
    if found is None:
        return 1
    envelope, spool = found
    print(envelope.to_json())
    print()
    try:
        with spool.data(args.id) as f:
            header = f.read(64 * 1024)
    except FileNotFoundError:
        print(f"{PROG}: {args.id} left the queue just now", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"{PROG}: message {args.id} cannot be read: {e}", file=sys.stderr)
        return 1
    for line in header.split(b"\r\n"):
        if not line:
            break
        print(printable(line.decode("utf-8", "replace")))
    return 0


def printable(text: str) -> str:
    """C{text} with what a terminal would act on (escape sequences) made visible."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _signal(spools: list[Spool]) -> int:
    """SIGUSR1 to every running bridge (or worker) of these spools; how many got it."""
    told = 0
    for spool in spools:
        for pid in spool.runners():
            try:
                os.kill(pid, signal.SIGUSR1)
                told += 1
            except ProcessLookupError:
                spool.unregister(pid)  # a bridge that died without unregistering
            except PermissionError:
                print(f"{PROG}: not allowed to signal process {pid} (run as the bridge's "
                      "user)", file=sys.stderr)
    return told


def _flush(spools: list[Spool], args: argparse.Namespace) -> int:
    if args.id is None:
        for spool in spools:
            spool.request_flush("all")
    else:
        found = _find(spools, args.id)
        if found is None:
            return 1
        found[1].request_flush(args.id)
        spools = [found[1]]  # only its runner: to the others a signal means "flush all"
    told = _signal(spools)
    print(f"flush requested for {args.id or 'every message'}; " + (
        f"{told} running bridge(s) told" if told else "no bridge running: it is tried "
                                                       "when the bridge starts"))
    return 0


def _holds(spool: Spool, message_id: str) -> bool:
    try:
        os.stat(spool.path(message_id))  # (a spool it may not read raises: said so)
    except FileNotFoundError:
        return False
    return True


def _delete(spools: list[Spool], args: argparse.Namespace) -> int:
    for _ in range(len(spools) + 1):  # (again where a starting worker moved it meanwhile)
        # Found by its file, not its envelope: one whose files cannot be read goes too.
        spool = next((s for s in spools if _holds(s, args.id)), None)
        if spool is None:
            print(f"{PROG}: no message {args.id}", file=sys.stderr)
            return 1
        with spool.locked(args.id, read=False) as data:
            if data is not None:
                spool.remove(args.id)
                break
        if _holds(spool, args.id):
            print(f"{PROG}: {args.id} is being delivered (or moved) right now; try again",
                  file=sys.stderr)
            return 1
    else:
        print(f"{PROG}: {args.id} is being moved between spools; try again", file=sys.stderr)
        return 1
    spool.request_flush(args.id)  # the running bridge sees it gone, and its space free
    _signal([spool])
    print(f"{args.id} deleted")
    return 0


def _mark(spools: list[Spool], message_id: str, held: bool) -> Spool | None:
    """Hold the message, or release it; None (and said so) when no spool has it.  A
    message a starting worker takes over meanwhile is marked again where it went."""
    for _ in range(len(spools) + 1):
        found = _find(spools, message_id)
        if found is None:
            return None
        spool = found[1]
        made = held and not spool.held(message_id)
        spool.hold(message_id, on=held)
        if _holds(spool, message_id):
            return spool
        if made:  # gone meanwhile: no marker of ours left behind (one already there may
            spool.hold(message_id, on=False)  # be a take-over's, still to carry over)
    print(f"{PROG}: {message_id} is being moved between spools; try again", file=sys.stderr)
    return None


def _hold(spools: list[Spool], args: argparse.Namespace) -> int:
    spool = _mark(spools, args.id, True)
    if spool is None:
        return 1
    with spool.locked(args.id, read=False) as data:
        under_way = data is None and _holds(spool, args.id)
    print(f"{args.id} held" + ("; the delivery attempt under way right now goes on"
                               if under_way else ""))
    return 0


def _release(spools: list[Spool], args: argparse.Namespace) -> int:
    spool = _mark(spools, args.id, False)
    if spool is None:
        return 1
    spool.request_flush(args.id)
    _signal([spool])
    print(f"{args.id} released")
    return 0
