"""Which spool directory each process owns.

A single process owns the configured directory.  With ``[server] workers`` above 1,
worker K owns ``worker-K/`` inside it (L{worker_directory}).  When the number of workers
changes, some directories are owned by no process any more: at its start worker 1 takes
over the top directory's messages (from a single process before) and those of workers
beyond the count, and a single process takes over every worker's (L{orphans}, with
L{adopt}).  The queue command acts on them all
(L{spool_directories}).
"""

from __future__ import annotations

import os
import re
from contextlib import suppress

from smtpbridge.spool import Spool, fsync_directory

_WORKER = re.compile(r"worker-([1-9][0-9]*)")


def worker_directory(directory: str, worker: int) -> str:
    """The spool directory worker C{worker} owns inside the configured C{directory}."""
    return os.path.join(directory, f"worker-{worker}")


def spool_directories(directory: str) -> list[str]:
    """Every spool that exists under the configured C{directory}: its own, then each
    worker's in the workers' order."""
    workers: list[tuple[int, str]] = []
    with suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(directory):
            match = _WORKER.fullmatch(name)
            if match is not None:
                workers.append((int(match.group(1)), os.path.join(directory, name)))
    candidates = [directory] + [path for _, path in sorted(workers)]
    return [path for path in candidates if os.path.isdir(os.path.join(path, "queue"))]


def orphans(directory: str, worker: int | None, workers: int) -> list[str]:
    """The spools under C{directory} that the spool of C{worker} (None: a single process)
    takes over when it starts, because no process owns them with C{workers} workers."""
    found = [path for path in spool_directories(directory) if path != directory]
    if worker is None:
        return found
    if worker != 1:
        return []
    beyond = [path for path in found
              if int(os.path.basename(path).removeprefix("worker-")) > workers]
    return ([directory] if os.path.isdir(os.path.join(directory, "queue")) else []) + beyond


def adopt(spool: Spool, directory: str) -> int:
    """Move every message of the spool in C{directory}, which no process runs, into
    C{spool}, held ones still held; how many.  A crash at any point leaves each
    message whole in one of the two."""
    other = Spool(directory, 0)
    other.prepare()
    moved = other.ids()
    for message_id in moved:
        # The data is linked in first: until the envelope moves, C{spool} holds
        # data without an envelope (which a start clears) and the other the message.
        with suppress(FileExistsError):
            os.link(other.path(message_id), spool.path(message_id))
        fsync_directory(os.path.join(spool.directory, "queue"))
        os.replace(other.path(message_id, "json"), spool.path(message_id, "json"))
        fsync_directory(os.path.join(spool.directory, "queue"))
        os.unlink(other.path(message_id))
        if other.held(message_id):
            spool.hold(message_id)
            other.hold(message_id, on=False)
        with suppress(OSError):
            spool.stored += os.path.getsize(spool.path(message_id))
    if moved:
        fsync_directory(os.path.join(directory, "queue"))
    return len(moved)
