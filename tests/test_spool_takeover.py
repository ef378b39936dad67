"""A spool taken over at start (the number of workers changed) while the queue command
acts on its messages: each interleaving ends as the command said it did."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpbridge import queuecli, spooldirs
from smtpbridge.spool import Spool
from smtpbridge.spooldirs import adopt, worker_directory
from tests.test_spool import kept_in
from tests.test_spool import queue_command as queue


def taking_over(tmp_path: Path) -> tuple[str, Spool, str, Spool]:
    """A message left by a single process before, and the spool of worker 1, which
    takes it over when it starts."""
    base = str(tmp_path / "spool")
    top, [kept] = kept_in(base)
    first = Spool(worker_directory(base, 1), 10 * 1024 * 1024)
    first.prepare()
    return base, top, kept, first


def test_a_message_a_queue_command_has_is_left_for_the_next_start(tmp_path: Path) -> None:
    base, top, kept, first = taking_over(tmp_path)
    with top.locked(kept, read=False) as data:  # as `queue delete` holds it
        assert data is not None
        moved, problems = adopt(first, base)
    assert (moved, problems) == (0, [f"{base}: message {kept}: in use (a queue command, or a "
                                     "delivery by a process still running); left for the "
                                     "next start"])
    assert top.ids() == [kept] and first.ids() == []
    assert adopt(first, base) == (1, [])  # the next start takes it
    assert first.ids() == [kept] and top.ids() == []


def moving_on_lock(monkeypatch: pytest.MonkeyPatch, base: str, first: Spool) -> None:
    """The next lock taken finds the message moved into C{first} between the open of
    its file and the lock: a starting worker took it over."""
    real = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        monkeypatch.setattr(fcntl, "flock", real)
        assert adopt(first, base)[0] == 1
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_a_message_moved_before_its_lock_is_not_locked_where_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, top, kept, first = taking_over(tmp_path)
    moving_on_lock(monkeypatch, base, first)
    with top.locked(kept) as data:
        assert data is None  # (a delete here would have left the moved message alone)
    with first.locked(kept) as data:
        assert data is not None


def test_a_delete_follows_a_message_taken_over_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    base, top, kept, first = taking_over(tmp_path)
    moving_on_lock(monkeypatch, base, first)
    assert queue(tmp_path, capsys, "delete", kept) == (0, f"{kept} deleted\n")
    assert top.ids() == [] and first.ids() == []


@pytest.mark.parametrize("held", [True, False])
def test_a_hold_or_release_follows_a_message_taken_over_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        held: bool) -> None:
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    base, top, kept, first = taking_over(tmp_path)
    top.hold(kept, on=not held)
    find = queuecli._find

    def found_then_moved(spools: list[Spool], message_id: str) -> Any:
        monkeypatch.setattr(queuecli, "_find", find)
        where = find(spools, message_id)
        assert adopt(first, base)[0] == 1  # after the command found it
        return where

    monkeypatch.setattr(queuecli, "_find", found_then_moved)
    code, said = queue(tmp_path, capsys, "hold" if held else "release", kept)
    assert code == 0 and said.startswith(f"{kept} {'held' if held else 'released'}")
    assert first.held(kept) is held


@pytest.mark.parametrize("held", [True, False])
def test_a_hold_or_release_made_while_a_message_moves_goes_with_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: bool) -> None:
    base, top, kept, first = taking_over(tmp_path)
    top.hold(kept, on=not held)
    rename = os.rename

    def marked_then_renamed(source: str, target: str) -> None:
        top.hold(kept, on=held)  # the queue command, before the message is gone
        rename(source, target)

    monkeypatch.setattr(spooldirs.os, "rename", marked_then_renamed)
    assert adopt(first, base)[0] == 1
    monkeypatch.undo()
    assert first.held(kept) is held and not top.held(kept)


def test_a_message_delivered_while_a_command_acts_on_it_is_said_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    base = str(tmp_path / "spool")
    top, [one, two] = kept_in(base, 2)  # a single process's spool
    real = fcntl.flock

    def delivered_first(fd: int, operation: int) -> None:
        monkeypatch.setattr(fcntl, "flock", real)
        top.remove(one)  # the runner delivered it between the open and the lock
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", delivered_first)
    assert queue(tmp_path, capsys, "delete", one) == (1, f"smtpbridge: queue: no message {one}\n")
    find = queuecli._find

    def found_then_delivered(spools: list[Spool], message_id: str) -> Any:
        monkeypatch.setattr(queuecli, "_find", find)
        where = find(spools, message_id)
        top.remove(message_id)  # delivered after the command found it
        return where

    monkeypatch.setattr(queuecli, "_find", found_then_delivered)
    assert queue(tmp_path, capsys, "hold", two) == (1, f"smtpbridge: queue: no message {two}\n")
    assert not top.held(two)  # no marker left for a message that is gone


def test_a_message_deleted_as_it_is_taken_over_is_not_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, top, kept, first = taking_over(tmp_path)
    real = fcntl.flock

    def deleted_first(fd: int, operation: int) -> None:
        monkeypatch.setattr(fcntl, "flock", real)
        top.remove(kept)  # `queue delete`, between the listing and the move
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", deleted_first)
    assert adopt(first, base) == (0, [])
    assert first.ids() == [] and top.ids() == []


def test_a_hold_made_again_while_a_held_message_moves_stays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The message is held already; `queue hold` marks it in the spool it leaves, the
    take-over renames it, and the command finds it gone there and holds it where it
    went.  The marker it found there is the take-over's to carry over, not the
    command's to clear."""
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    base, top, kept, first = taking_over(tmp_path)
    top.hold(kept)
    # In order: the take-over holds it in worker-1/; it comes to rename; the command
    # (run from within that rename) marks the top spool; the rename happens at the
    # command's check, which finds it gone; the command holds it in worker-1/; the
    # take-over compares the top spool's marker with what it found at first.
    rename, holds = os.rename, queuecli._holds
    said: list[tuple[int, str]] = []

    def command_during_the_move(source: str, target: str) -> None:
        monkeypatch.setattr(spooldirs.os, "rename", rename)

        def moved_before_the_check(spool: Spool, message_id: str) -> bool:
            monkeypatch.setattr(queuecli, "_holds", holds)
            rename(source, target)  # the take-over's rename, after the command's mark
            return holds(spool, message_id)

        monkeypatch.setattr(queuecli, "_holds", moved_before_the_check)
        said.append(queue(tmp_path, capsys, "hold", kept))

    monkeypatch.setattr(spooldirs.os, "rename", command_during_the_move)
    assert adopt(first, base) == (1, [])
    [(code, text)] = said  # (the take-over's lock looks like a delivery under way)
    assert code == 0 and text.startswith(f"{kept} held")
    assert first.held(kept) and not top.held(kept)


def test_a_hold_that_cannot_be_carried_over_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, top, kept, first = taking_over(tmp_path)
    rename = os.rename

    def held_then_renamed(source: str, target: str) -> None:
        top.hold(kept)  # the queue command, before the message is gone
        rename(source, target)

    def full(message_id: str, on: bool = True) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spooldirs.os, "rename", held_then_renamed)
    monkeypatch.setattr(first, "hold", full)
    assert adopt(first, base) == (1, [f"{base}: message {kept}: taken over, but its hold "
                                      "could not be carried over: No space left on device"])
    assert first.ids() == [kept] and top.ids() == []


def test_a_command_stops_following_a_message_that_keeps_moving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each spool is looked in a bounded number of times: a message seen in a spool and
    gone from it at every look (it cannot be, but no loop relies on that) ends the
    command with a line to try again."""
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    _, top, kept, _ = taking_over(tmp_path)
    looks = itertools.count()
    # Found where it is, gone at the check right after: for ever.
    monkeypatch.setattr(queuecli, "_holds", lambda spool, message_id: next(looks) % 2 == 0)

    @contextlib.contextmanager
    def busy(spool: Spool, message_id: str, read: bool = True) -> Iterator[None]:
        yield None

    monkeypatch.setattr(Spool, "locked", busy)
    assert queue(tmp_path, capsys, "delete", kept) == (
        1, f"smtpbridge: queue: {kept} is being moved between spools; try again\n")
    monkeypatch.setattr(queuecli, "_holds", lambda spool, message_id: False)
    assert queue(tmp_path, capsys, "hold", kept) == (
        1, f"smtpbridge: queue: {kept} is being moved between spools; try again\n")
    assert not top.held(kept) and top.ids() == [kept]  # no marker left, nothing removed
