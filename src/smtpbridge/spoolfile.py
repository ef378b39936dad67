"""One message's file in the spool: its format, and the writer that makes it durable.

A message is ``queue/<id>.msg``: a header line (the format, and the length of the
envelope that follows it), the envelope as the message was accepted (JSON), and the
message as it goes upstream (CRLF lines, not dot-stuffed, never changed).  Its delivery
state, once it changes, is ``queue/<id>.json`` beside it, which then supersedes the
envelope in the ``.msg``.  L{smtpbridge.spool} holds the rest of the spool's rules;
L{SafetyNet} is what the relay sees of it.

Only blocking file operations, no reactor: the callers choose the thread.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from contextlib import suppress
from typing import BinaryIO, Protocol

from twisted.internet.defer import Deferred

from smtpbridge.interfaces import Params
from smtpbridge.model import ClientInfo, Envelope, UpstreamAccount


def queue_path(directory: str, message_id: str, suffix: str = "msg") -> str:
    return os.path.join(directory, "queue", f"{message_id}.{suffix}")


#: The first line of a ``.msg`` file: the format, then the length of the envelope that
#: follows (0: the envelope is the ``.json`` beside it).
_MAGIC = b"smtpbridge-spool-1 "
HEADER_SIZE = len(_MAGIC) + 12


def _header(envelope_size: int) -> bytes:
    return _MAGIC + b"%010d\r\n" % envelope_size


def envelope_size(f: BinaryIO) -> int:
    """The length of the envelope after the header (read from C{f}'s start)."""
    header = f.read(HEADER_SIZE)
    digits = header[len(_MAGIC):-2]
    if len(header) != HEADER_SIZE or not header.startswith(_MAGIC) or \
            not digits.isdigit() or not header.endswith(b"\r\n"):
        raise ValueError(f"{getattr(f, 'name', 'a spool file')}: not a spool file")
    return int(digits)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same_file(f: BinaryIO, path: str) -> bool:
    """True when C{path} still names the file C{f} is open on."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(f.fileno())
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def _link(temporary: str, final: str, made: list[str]) -> None:
    """Move C{temporary} (in ``tmp/``) to C{final}, which must not exist."""
    os.link(temporary, final)
    made.append(final)
    os.unlink(temporary)


def write_file(path: str, data: bytes) -> None:
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

    def __init__(self, spool: Store, message_id: str) -> None:
        self._spool = spool
        self.id = message_id
        self._path = os.path.join(spool.directory, "tmp", f"{message_id}.msg")
        self._file: BinaryIO | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._error: OSError | None = None
        self._created = False  # the file in tmp/ is ours (not another's of the same id)
        self._done = False  # committed or discarded
        self.size = 0  # bytes of the message
        # False: kept even past the spool's max_size (a bounce, or the recipients left
        # of a message the upstream took for the others: refusing it helps nobody).
        self.budgeted = True
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

    def _write_out(self, envelope_size: int = 0) -> None:
        """The file, created if need be, gets what the buffer holds (after the header,
        when it is created: C{envelope_size} is the length of the envelope the buffer
        begins with)."""
        if self._file is None:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._created = True
            # Buffered: its write() writes everything or raises (a raw one may write
            # part of the data, on a full disk or at a file size limit).
            self._file = os.fdopen(fd, "wb")
            self._file.write(_header(envelope_size))
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
        made: list[str] = []  # what this commit made, to remove if it fails
        claimed = False  # its bytes count as stored
        try:
            if self._error is not None:
                raise self._error
            state = envelope.to_json().encode("utf-8")
            embedded = self._file is None  # all of it in memory: one file, the envelope in it
            stored = HEADER_SIZE + self.size + (len(state) if embedded else 0)
            if not spool.claim(self.id, self.size, stored, self.budgeted):
                raise OSError(errno.ENOSPC, "the spool is full (max_size)")
            claimed = True
            if embedded:
                self._buffer.insert(0, state)
                self._write_out(len(state))
                self._sync()
            else:
                self._write_out()
                self._sync()
                temporary = os.path.join(spool.directory, "tmp", f"{self.id}.json")
                made.append(temporary)
                write_file(temporary, state)
                _link(temporary, queue_path(spool.directory, self.id, "json"), made)
            # Linked, not renamed: a message of the same id (ids are random) is never
            # replaced; this one fails instead, and the device tries again.
            _link(self._path, queue_path(spool.directory, self.id), made)
            fsync_directory(os.path.join(spool.directory, "queue"))
        except BaseException:
            self._close()
            if self._created:
                made.append(self._path)
            for leftover in reversed(made):  # the .msg first: without it, no message
                with suppress(OSError):
                    os.unlink(leftover)
            if claimed:
                spool.gone(self.id)
            else:
                spool.release(self.size)
            raise

    def _sync(self) -> None:
        f, self._file = self._file, None
        assert f is not None
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()

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


def upgrade(directory: str, message_id: str) -> None:
    """A message kept in the first format of the spool (``<id>.eml``, the data alone,
    and ``<id>.json``) gets its ``.msg`` (a header with no envelope, then the data), the
    ``.json`` staying its envelope; then the ``.eml`` goes."""
    old, new = queue_path(directory, message_id, "eml"), queue_path(directory, message_id)
    if not os.path.exists(new):  # (else a crash came after the link: the .msg is whole)
        temporary = os.path.join(directory, "tmp", f"{message_id}.msg")
        try:
            with open(old, "rb") as source, os.fdopen(os.open(
                    temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as target:
                target.write(_header(0))
                shutil.copyfileobj(source, target)
                target.flush()
                os.fsync(target.fileno())
            _link(temporary, new, [])
        except BaseException:
            with suppress(OSError):
                os.unlink(temporary)
            raise
    fsync_directory(os.path.join(directory, "queue"))  # the .msg is there for good
    os.unlink(old)


def skip_header(f: BinaryIO) -> None:
    """C{f}, a ``.msg`` file, is read from where the message begins from now on."""
    f.seek(0)
    f.seek(HEADER_SIZE + envelope_size(f))


def open_data(path: str) -> BinaryIO:
    """The ``.msg`` file at C{path}, opened and read from where the message begins."""
    f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    try:
        skip_header(f)
    except BaseException:
        f.close()
        raise
    return f


def read_envelope(path: str) -> Envelope | None:
    """The envelope in the ``.msg`` file at C{path}; None when it has none (its envelope
    is the ``.json`` beside it).  Raises FileNotFoundError when it is gone."""
    with open(path, "rb") as f:
        size = envelope_size(f)
        state = f.read(size)
    if size == 0:
        return None
    if len(state) != size:
        raise ValueError(f"{path}: its envelope is cut short")
    return parse_envelope(path, state)


def parse_envelope(path: str, state: bytes) -> Envelope:
    """The envelope written as C{state} in the file at C{path}; ValueError when it is
    none."""
    try:
        return Envelope.from_json(state.decode("utf-8"))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: no envelope ({e.__class__.__name__})") from None


class Store(Protocol):
    """What a writer needs of its spool: the directory, and the count of its bytes
    (being written: L{reserve}, L{release}; from being written to stored: L{claim};
    stored: L{gone})."""

    directory: str

    def reserve(self, size: int) -> None: ...

    def release(self, size: int) -> None: ...

    def claim(self, message_id: str, written: int, stored: int, budgeted: bool) -> bool: ...

    def gone(self, message_id: str) -> None: ...


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
