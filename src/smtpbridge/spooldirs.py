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

import errno
import os
import re
from contextlib import suppress

from smtpbridge.spool import Spool
from smtpbridge.spoolfile import fsync_directory

_WORKER = re.compile(r"worker-([1-9][0-9]*)")


def worker_directory(directory: str, worker: int) -> str:
    """The spool directory worker C{worker} owns inside the configured C{directory}."""
    return os.path.join(directory, f"worker-{worker}")


def unusable(directory: str) -> str | None:
    """Why the bridge cannot keep messages in C{directory} (made, 0700, if missing), or
    None: checked before anything starts, so that a start fails in one line."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        return f"cannot create {directory}: {e.strerror}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot write in {directory}: {os.strerror(errno.EACCES)}"
    return None


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


def adopt(spool: Spool, directory: str) -> tuple[int, list[str]]:
    """Move every message of the spool in C{directory}, which no process runs, into
    C{spool}, held ones still held.  How many moved, and why any did not (they stay where
    they are, for the queue command and the next start).  A crash at any point leaves
    each message whole in one of the two."""
    other = Spool(directory, 0)
    try:
        problems = [f"{directory}: {problem}" for problem in other.prepare()]
        ids = other.ids()
    except OSError as e:
        return 0, [f"{directory}: {e.strerror or e}"]
    moved = 0
    for message_id in ids:
        try:
            went, problem = _move(other, spool, message_id)
        except OSError as e:
            problem, went = e.strerror or str(e), False
        moved += went
        if problem is not None:
            problems.append(f"{directory}: message {message_id}: {problem}")
    if moved:
        with suppress(OSError):
            fsync_directory(os.path.join(directory, "queue"))
    return moved, problems


def _move(other: Spool, spool: Spool, message_id: str) -> tuple[bool, str | None]:
    """Move one message: whether it moved (not when it was gone meanwhile), and what
    went wrong once it had.  OSError when it stays where it is."""
    if os.path.exists(spool.path(message_id)):
        raise FileExistsError(errno.EEXIST, f"a message of that id is in {spool.directory}")
    # Locked while it moves, as a delivery would lock it: a queue command's delete waits
    # for neither, and one that has the message now leaves it here for the next start.
    with other.locked(message_id, read=False) as locked:
        if locked is None:
            if os.path.exists(other.path(message_id)):
                raise OSError(errno.EBUSY, "in use (a queue command, or a delivery by a "
                                           "process still running); left for the next start")
            return False, None  # deleted meanwhile
        return True, _move_locked(other, spool, message_id)


def _move_locked(other: Spool, spool: Spool, message_id: str) -> str | None:
    held = other.held(message_id)
    if held:  # held before it arrives, so that it is never sent
        spool.hold(message_id)
    try:
        if os.path.exists(other.path(message_id, "json")):  # its state goes first
            temporary = os.path.join(spool.directory, "tmp", f"{message_id}.json")
            with suppress(FileNotFoundError):
                os.unlink(temporary)
            os.link(other.path(message_id, "json"), temporary)
            os.replace(temporary, spool.path(message_id, "json"))
            fsync_directory(os.path.join(spool.directory, "queue"))
        # Renamed: the message is in one spool or the other, never in both.
        os.rename(other.path(message_id), spool.path(message_id))
    except OSError:
        if held:
            spool.hold(message_id, on=False)
        with suppress(OSError):  # (a state with no message is none; gone at a start)
            if not os.path.exists(spool.path(message_id)):
                os.unlink(spool.path(message_id, "json"))
        raise
    # Moved.  A state left in the other spool is cleared by its next start.
    for directory in (spool.directory, other.directory):
        with suppress(OSError):
            fsync_directory(os.path.join(directory, "queue"))
    with suppress(OSError):
        os.unlink(other.path(message_id, "json"))
    spool.counted(message_id)
    flush = os.path.join(other.directory, "flush", message_id)
    # A queue command's hold or release until now counts (one after it finds the message
    # gone from here and does it again where it went).
    problem = None
    if other.held(message_id) != held:
        try:
            spool.hold(message_id, on=not held)
        except OSError as e:
            problem = (f"taken over, but its {'release' if held else 'hold'} could not be "
                       f"carried over: {e.strerror or e}")
    with suppress(OSError):
        other.hold(message_id, on=False)
    with suppress(OSError):
        if os.path.exists(flush):  # asked to be tried at once: still so
            spool.request_flush(message_id)
            os.unlink(flush)
    return problem
