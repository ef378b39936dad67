"""The spool on disk: messages the bridge has taken responsibility for.

A message is ``queue/<id>.msg``, its envelope and data in one file, with its delivery
state beside it in ``queue/<id>.json`` once that changes (L{smtpbridge.spoolfile} has the
format).  A message is written to ``tmp/``, fsynced, linked into ``queue/`` and the
directory fsynced, so a crash leaves it whole or absent: one file, two fsyncs.  A
message too large to be held in memory to its end goes to ``tmp/`` as it arrives, before
its envelope is known: its commit links its ``.json`` into ``queue/`` first and its
``.msg`` last.  A message exists while its ``.msg`` does: it is removed ``.msg`` first.
``hold/<id>`` marks a message held by the administrator, ``flush/<id>`` (or
``flush/all``) one to retry at once.  Files are 0600 in 0700 directories.

One process owns a spool directory: it clears what a crash left there when it starts.
L{smtpbridge.spooldirs} says which directory each process owns with workers, and moves
the messages of those no process owns any more.

Only blocking file operations, no reactor: the callers choose the thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import BinaryIO

from smtpbridge.model import Envelope
from smtpbridge.spoolfile import (
    SpoolWriter,
    fsync_directory,
    open_data,
    parse_envelope,
    queue_path,
    read_envelope,
    same_file,
    skip_header,
    upgrade,
    write_file,
)

#: The files a spool directory holds.
SUBDIRECTORIES = ("tmp", "queue", "hold", "flush", "run")


def new_id(now: float) -> str:
    """A queue id: sortable by time, unique by its random part (16 hex digits)."""
    return f"{int(now):08X}{secrets.token_hex(4).upper()}"


def _started(pid: int) -> str:
    """When process C{pid} started (in clock ticks since boot), as /proc says; "" when
    that cannot be known."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode("ascii")
    except (OSError, IndexError):
        return ""


def _unfinished(path: str) -> bool:
    """True for a ``.msg`` with no envelope in it or beside it: the commit of a large
    message that a crash cut before the device heard 250 (a file that is no spool file
    is left alone)."""
    try:
        return read_envelope(path) is None
    except (OSError, ValueError):
        return False


class Spool:
    """A spool directory: messages written, committed, listed, updated and removed.

    C{max_size} bounds the bytes it holds: L{full} says when no new message should be
    taken (counting those being written), and a commit that would go beyond it fails.
    """

    def __init__(self, directory: str, max_size: int) -> None:
        self.directory = directory
        self.max_size = max_size
        self.stored = 0  # bytes of committed messages
        self.sizes: dict[str, int] = {}  # of each of them, by id
        self.writing = 0  # bytes of messages being written
        self._lock = threading.Lock()

    def prepare(self) -> list[str]:
        """Create the directories (0700); clear what a crash left in ``tmp/`` and ``run/``
        and message data without an envelope; count what is stored.  Only the one process
        that owns the directory does this, when it starts.  Returns what it could not do
        (messages of the first format it could not give their ``.msg``: they stay as they
        are, and the next start tries again)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for name in SUBDIRECTORIES:
            os.makedirs(os.path.join(self.directory, name), mode=0o700, exist_ok=True)
        # What a crash left: files half written, and the process ids of runners gone
        # (one of them reused by another process must not get the queue's SIGUSR1).
        for name in ("tmp", "run"):
            for entry in os.listdir(os.path.join(self.directory, name)):
                with suppress(OSError):
                    os.unlink(os.path.join(self.directory, name, entry))
        queue = os.path.join(self.directory, "queue")
        names = set(os.listdir(queue))
        problems = []
        for name in names:
            stem, _, suffix = name.rpartition(".")
            if suffix == "eml" and f"{stem}.json" in names:  # the first format's
                try:
                    upgrade(self.directory, stem)
                except OSError as e:
                    problems.append(f"message {stem} (kept as it was): {e.strerror or e}")
            elif suffix == "eml":  # its commit did not finish
                with suppress(OSError):
                    os.unlink(os.path.join(queue, name))
        names = set(os.listdir(queue))
        self.stored = 0
        self.sizes.clear()
        for name in names:
            stem, _, suffix = name.rpartition(".")
            path = os.path.join(queue, name)
            if suffix == "json" and not {f"{stem}.msg", f"{stem}.eml"} & names:
                with suppress(OSError):  # a removal that did not finish
                    os.unlink(path)
            elif suffix == "msg" and f"{stem}.json" not in names and _unfinished(path):
                with suppress(OSError):
                    os.unlink(path)
            elif suffix == "msg":
                with suppress(OSError):
                    self.sizes[stem] = os.path.getsize(path)
                    self.stored += self.sizes[stem]
        for marker in ("hold", "flush"):  # markers of messages gone since (not "all")
            for name in os.listdir(os.path.join(self.directory, marker)):
                if name != "all" and not {f"{name}.msg", f"{name}.eml"} & names:
                    with suppress(OSError):
                        os.unlink(os.path.join(self.directory, marker, name))
        return problems

    # Space.

    def full(self, more: int = 0) -> bool:
        """True when C{more} bytes would not fit in C{max_size}."""
        return self.stored + self.writing + more >= self.max_size

    # (Commits run in threads: the counts change under a lock.)

    def reserve(self, size: int) -> None:
        with self._lock:
            self.writing += size

    def release(self, size: int) -> None:
        with self._lock:
            self.writing = max(0, self.writing - size)

    def claim(self, message_id: str, written: int, stored: int,
              budgeted: bool = True) -> bool:
        """A message of C{written} bytes being committed counts as C{stored} bytes held
        from now on; False (nothing changed) when C{budgeted} and they do not fit in
        C{max_size} (what is being written besides does not count: the first to commit
        has the room)."""
        with self._lock:
            if message_id in self.sizes:  # (ids are random: once in four billion)
                raise FileExistsError(errno.EEXIST, f"a message {message_id} is queued")
            if budgeted and self.stored + stored > self.max_size:
                return False
            self.writing = max(0, self.writing - written)
            self.stored += stored
            self.sizes[message_id] = stored
            return True

    def gone(self, message_id: str) -> None:
        """The message is no longer held (removed, here or by the queue command, or its
        commit failed): its bytes no longer count."""
        with self._lock:
            self.stored = max(0, self.stored - self.sizes.pop(message_id, 0))

    def counted(self, message_id: str) -> None:
        """The message arrived (taken over from another spool): its bytes count."""
        with suppress(OSError), self._lock:
            self.sizes[message_id] = os.path.getsize(self.path(message_id))
            self.stored += self.sizes[message_id]

    # Messages.

    def writer(self, now: float | None = None) -> SpoolWriter:
        return SpoolWriter(self, new_id(time.time() if now is None else now))

    def path(self, message_id: str, suffix: str = "msg") -> str:
        return queue_path(self.directory, message_id, suffix)

    def ids(self) -> list[str]:
        """The ids of every message in the queue, oldest first."""
        names = os.listdir(os.path.join(self.directory, "queue"))
        return sorted(name[:-4] for name in names if name.endswith(".msg"))

    def load(self, message_id: str) -> Envelope | None:
        """The message's envelope, or None when it is gone (delivered or deleted).
        Raises ValueError when its files are no spool files."""
        try:  # its state once it changed, else the envelope it was accepted with
            with open(self.path(message_id, "json"), "rb") as f:
                state = f.read()
        except FileNotFoundError:
            pass
        else:
            if not os.path.exists(self.path(message_id)):  # a state left of a message gone
                return None
            return parse_envelope(self.path(message_id, "json"), state)
        try:
            return read_envelope(self.path(message_id))
        except FileNotFoundError:
            return None

    def envelopes(self, unreadable: list[str] | None = None) -> Iterator[Envelope]:
        """Every message's envelope; those that cannot be read are left out (and said in
        C{unreadable}, with why)."""
        for message_id in self.ids():
            try:
                envelope = self.load(message_id)
            except ValueError as e:
                if unreadable is not None:
                    unreadable.append(f"{message_id}: {e}")
                continue
            if envelope is not None:
                yield envelope

    def update(self, envelope: Envelope) -> bool:
        """Replace the message's envelope (its state after an attempt); False when the
        message is gone meanwhile (then nothing is written)."""
        final = self.path(envelope.id, "json")
        if not os.path.exists(self.path(envelope.id)):
            return False
        temporary = os.path.join(self.directory, "tmp", f"{envelope.id}.json")
        write_file(temporary, envelope.to_json().encode("utf-8"))
        os.replace(temporary, final)
        # Durable before the next attempt: recipients it took are not tried again.
        fsync_directory(os.path.join(self.directory, "queue"))
        return True

    def remove(self, message_id: str) -> bool:
        """Remove a message (its ``.msg`` first: without it the state is no message);
        False when it was not there."""
        existed = False
        with suppress(FileNotFoundError):
            os.unlink(self.path(message_id))
            existed = True
        self.gone(message_id)
        with suppress(FileNotFoundError):
            os.unlink(self.path(message_id, "json"))
        for marker in ("hold", "flush"):
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, marker, message_id))
        return existed

    @contextmanager
    def data(self, message_id: str) -> Iterator[BinaryIO]:
        """The message as it goes upstream: its file, read from where the message begins
        to its end.  Raises FileNotFoundError when it is gone."""
        with open_data(self.path(message_id)) as f:
            yield f

    @contextmanager
    def locked(self, message_id: str, read: bool = True) -> Iterator[BinaryIO | None]:
        """The message (as L{data}; not read when not C{read}), locked for one delivery
        attempt (or for the queue command that changes it); None when it is gone or
        locked by another."""
        try:
            f = open(self.path(message_id), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            yield None
            return
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            if not same_file(f, self.path(message_id)):  # removed or moved meanwhile
                yield None
                return
            if read:
                skip_header(f)
            yield f

    # The processes that deliver from this spool, for the queue command's signals.

    def register(self, pid: int) -> None:
        write_file(os.path.join(self.directory, "run", str(pid)), _started(pid).encode())

    def unregister(self, pid: int) -> None:
        with suppress(FileNotFoundError):
            os.unlink(os.path.join(self.directory, "run", str(pid)))

    def runners(self) -> list[int]:
        """The process ids that registered (some may be gone; one another process took
        since, after a crash, is left out: it must not get the queue's signals)."""
        found = []
        for name in os.listdir(os.path.join(self.directory, "run")):
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(self.directory, "run", name), "rb") as f:
                    started = f.read(64).decode("ascii", "replace")
            except OSError:
                continue
            if not started or started == _started(int(name)):
                found.append(int(name))
        return found

    # Markers the queue command leaves for the runner.

    def _marker(self, kind: str, message_id: str) -> str:
        return os.path.join(self.directory, kind, message_id)

    def held(self, message_id: str) -> bool:
        return os.path.exists(self._marker("hold", message_id))

    def hold(self, message_id: str, on: bool = True) -> None:
        marker = self._marker("hold", message_id)
        if on:
            write_file(marker, b"")
        else:
            with suppress(FileNotFoundError):
                os.unlink(marker)

    def request_flush(self, message_id: str = "all") -> None:
        write_file(self._marker("flush", message_id), b"")

    def take_flush_requests(self) -> set[str]:
        """The ids asked to be retried at once ("all" for every message), cleared."""
        directory = os.path.join(self.directory, "flush")
        names = set(os.listdir(directory))
        for name in names:
            with suppress(OSError):
                os.unlink(os.path.join(directory, name))
        return names
