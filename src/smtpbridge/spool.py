"""The spool on disk: messages the bridge has taken responsibility for.

Each message is two files in ``queue/``: ``<id>.eml``, the message as it goes upstream
(CRLF lines, not dot-stuffed, never changed), and ``<id>.json``, its envelope and
delivery state (replaced atomically at each change).  A message exists once its
``.json`` does: a message is written to ``tmp/``, fsynced, renamed into ``queue/``
(data first, envelope last) and the directory fsynced, so a crash leaves it whole or
absent.  ``hold/<id>`` marks a message held by the administrator, ``flush/<id>`` (or
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import BinaryIO, Protocol

from twisted.internet.defer import Deferred

from smtpbridge.interfaces import Params
from smtpbridge.model import ClientInfo, Envelope, UpstreamAccount

#: The files a spool directory holds.
SUBDIRECTORIES = ("tmp", "queue", "hold", "flush", "run")

def new_id(now: float) -> str:
    """A queue id: sortable by time, unique by its random part (16 hex digits)."""
    return f"{int(now):08X}{secrets.token_hex(4).upper()}"


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class SpoolWriter:
    """One message being written into the spool; nothing is in the queue until
    L{commit}, and L{discard} leaves no trace.

    The first L{MEMORY} bytes stay in memory: a small message (most are) touches the
    disk only when it is kept, in the thread that commits it.  Beyond, writes go to a
    file in ``tmp/``, sequential and not synced; a message that is kept is fsynced at
    commit.  A write that fails is not raised: the commit raises it.
    """

    #: Bytes of a message held in memory before it goes to a file.
    MEMORY = 32 * 1024

    def __init__(self, spool: Spool, message_id: str) -> None:
        self._spool = spool
        self.id = message_id
        self._path = os.path.join(spool.directory, "tmp", f"{message_id}.eml")
        self._file: BinaryIO | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._error: OSError | None = None
        self._created = False  # the file in tmp/ is ours (not another's of the same id)
        self._done = False  # committed or discarded
        self.size = 0
        spool.reserve(0)

    def write(self, lines: Sequence[bytes]) -> None:
        """Body lines, unstuffed and without line endings."""
        if self._done or not lines:
            return
        data = b"\r\n".join(lines) + b"\r\n"
        self.size += len(data)
        self._spool.reserve(len(data))
        if self._error is not None:
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._file is None and self._buffered <= self.MEMORY:
            return
        try:
            self._write_out()
        except OSError as e:
            self._error = e
            self._close()

    def _write_out(self) -> None:
        """The file, created if need be, gets what the buffer holds."""
        if self._file is None:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._created = True
            # Buffered: its write() writes everything or raises (a raw one may write
            # part of the data, on a full disk or at a file size limit).
            self._file = os.fdopen(fd, "wb")
        self._file.write(b"".join(self._buffer))
        self._buffer.clear()
        self._buffered = 0

    def _close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with suppress(OSError):
                f.close()

    def commit(self, envelope: Envelope) -> None:
        """Make the message durable in the queue (blocking: fsyncs; run it in a thread).
        Raises OSError when it cannot be stored; then nothing is in the queue."""
        if self._done:
            raise OSError(errno.EBADF, "the message was already committed or discarded")
        self._done = True
        spool = self._spool
        queue = os.path.join(spool.directory, "queue")
        temporary = os.path.join(spool.directory, "tmp", f"{self.id}.json")
        made: list[str] = []  # what this commit made, to remove if it fails
        try:
            if self._error is not None:
                raise self._error
            self._write_out()
            f = self._file
            assert f is not None
            f.flush()
            os.fsync(f.fileno())
            self._file = None
            f.close()
            # Linked, not renamed: a message of the same id (ids are random) is never
            # replaced; this one fails instead, and the device tries again.
            os.link(self._path, spool.path(self.id))
            made.append(spool.path(self.id))
            os.unlink(self._path)
            made.append(temporary)
            _write_file(temporary, envelope.to_json().encode("utf-8"))
            os.link(temporary, spool.path(self.id, "json"))
            made.append(spool.path(self.id, "json"))
            os.unlink(temporary)
            fsync_directory(queue)
        except OSError:
            self._close()
            if self._created:
                made.append(self._path)
            for leftover in reversed(made):  # the envelope first: without it, no message
                with suppress(OSError):
                    os.unlink(leftover)
            spool.release(self.size)
            raise
        spool.committed(self.size)

    def discard(self) -> None:
        """Forget the message: nothing of it stays."""
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        self._close()
        if self._created:
            with suppress(OSError):
                os.unlink(self._path)
        self._spool.release(self.size)


class Spool:
    """A spool directory: messages written, committed, listed, updated and removed.

    C{max_size} bounds the bytes it holds, committed and being written: L{full} says
    when no new message should be taken.
    """

    def __init__(self, directory: str, max_size: int) -> None:
        self.directory = directory
        self.max_size = max_size
        self.stored = 0  # bytes of committed messages
        self.writing = 0  # bytes of messages being written
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Create the directories (0700); clear what a crash left in ``tmp/`` and ``run/``
        and message data without an envelope; count what is stored.  Only the one process
        that owns the directory does this, when it starts."""
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
        self.stored = 0
        for name in names:
            stem, _, suffix = name.rpartition(".")
            if suffix == "eml" and f"{stem}.json" not in names:
                with suppress(OSError):
                    os.unlink(os.path.join(queue, name))  # a commit that did not finish
            elif suffix == "eml":
                with suppress(OSError):
                    self.stored += os.path.getsize(os.path.join(queue, name))
        for marker in ("hold", "flush"):  # markers of messages gone since (not "all")
            for name in os.listdir(os.path.join(self.directory, marker)):
                if name != "all" and f"{name}.json" not in names:
                    with suppress(OSError):
                        os.unlink(os.path.join(self.directory, marker, name))

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

    def committed(self, size: int) -> None:
        with self._lock:
            self.writing = max(0, self.writing - size)
            self.stored += size

    def forget(self, size: int) -> None:
        """C{size} bytes of stored messages are gone."""
        with self._lock:
            self.stored = max(0, self.stored - size)

    def counted(self, size: int) -> None:
        """C{size} bytes of stored messages arrived (taken over from another spool)."""
        with self._lock:
            self.stored += size

    # Messages.

    def writer(self, now: float | None = None) -> SpoolWriter:
        return SpoolWriter(self, new_id(time.time() if now is None else now))

    def path(self, message_id: str, suffix: str = "eml") -> str:
        return os.path.join(self.directory, "queue", f"{message_id}.{suffix}")

    def ids(self) -> list[str]:
        """The ids of every message in the queue, oldest first."""
        names = os.listdir(os.path.join(self.directory, "queue"))
        return sorted(name[:-5] for name in names if name.endswith(".json"))

    def load(self, message_id: str) -> Envelope | None:
        """The message's envelope, or None when it is gone (delivered or deleted)."""
        try:
            with open(self.path(message_id, "json"), encoding="utf-8") as f:
                return Envelope.from_json(f.read())
        except FileNotFoundError:
            return None

    def envelopes(self) -> Iterator[Envelope]:
        for message_id in self.ids():
            envelope = self.load(message_id)
            if envelope is not None:
                yield envelope

    def update(self, envelope: Envelope) -> bool:
        """Replace the message's envelope (its state after an attempt); False when the
        message is gone meanwhile (then nothing is written)."""
        final = self.path(envelope.id, "json")
        if not os.path.exists(final):
            return False
        temporary = os.path.join(self.directory, "tmp", f"{envelope.id}.json")
        _write_file(temporary, envelope.to_json().encode("utf-8"))
        os.replace(temporary, final)
        return True

    def remove(self, message_id: str) -> bool:
        """Remove a message (envelope first: without it the data is no message); False
        when it was not there."""
        existed = False
        with suppress(FileNotFoundError):
            os.unlink(self.path(message_id, "json"))
            existed = True
        with suppress(FileNotFoundError):
            size = os.path.getsize(self.path(message_id))
            os.unlink(self.path(message_id))
            self.forget(size)
        for marker in ("hold", "flush"):
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, marker, message_id))
        return existed

    @contextmanager
    def locked(self, message_id: str) -> Iterator[BinaryIO | None]:
        """The message's data, opened and locked for one delivery attempt (or for the
        queue command that changes it); None when it is gone or locked by another."""
        try:
            f = open(self.path(message_id), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            yield f
        finally:
            f.close()

    # The processes that deliver from this spool, for the queue command's signals.

    def register(self, pid: int) -> None:
        _write_file(os.path.join(self.directory, "run", str(pid)), b"")

    def unregister(self, pid: int) -> None:
        with suppress(FileNotFoundError):
            os.unlink(os.path.join(self.directory, "run", str(pid)))

    def runners(self) -> list[int]:
        """The process ids that registered (some may be gone)."""
        return [int(name) for name in os.listdir(os.path.join(self.directory, "run"))
                if name.isdigit()]

    # Markers the queue command leaves for the runner.

    def _marker(self, kind: str, message_id: str) -> str:
        return os.path.join(self.directory, kind, message_id)

    def held(self, message_id: str) -> bool:
        return os.path.exists(self._marker("hold", message_id))

    def hold(self, message_id: str, on: bool = True) -> None:
        marker = self._marker("hold", message_id)
        if on:
            _write_file(marker, b"")
        else:
            with suppress(FileNotFoundError):
                os.unlink(marker)

    def request_flush(self, message_id: str = "all") -> None:
        _write_file(self._marker("flush", message_id), b"")

    def take_flush_requests(self) -> set[str]:
        """The ids asked to be retried at once ("all" for every message), cleared."""
        directory = os.path.join(self.directory, "flush")
        names = set(os.listdir(directory))
        for name in names:
            with suppress(OSError):
                os.unlink(os.path.join(directory, name))
        return names


class SafetyNet(Protocol):
    """Where a message goes when the upstream cannot take it now: the spool, with the
    queue runner that delivers it later."""

    def accepts(self, account: UpstreamAccount | None) -> bool:
        """True when the account can deliver later (a configured account, not a client's
        own login, which is kept nowhere)."""

    def full(self) -> bool:
        """True when no more messages fit."""

    def writer(self) -> SpoolWriter:
        """A new message being written."""

    def keep(self, writer: SpoolWriter, sender: str, recipients: Sequence[str],
             account: UpstreamAccount, params: Params, client: ClientInfo,
             tried: bool = True) -> Deferred[str]:
        """Make the message durable and queue it; fires with its queue id, or fails with
        OSError (then nothing is queued).  C{tried}: the upstream was just tried, so the
        first delivery waits for the first retry."""
