"""Tests for smtpbridge.cli: the ``smtpbridge`` command."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator

import pytest

from smtpbridge import cli
from smtpbridge.users import verify_password


class FakeStdin(io.StringIO):
    """Standard input that claims, or not, to be a terminal."""

    def __init__(self, text: str = "", tty: bool = False) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def fast_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash with cheap scrypt parameters; the format is what is under test."""
    real = cli.hash_password
    monkeypatch.setattr(cli, "hash_password", lambda password: real(password, n=2**10))


def terminal(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    """Fake a terminal that answers the getpass prompts; returns the prompts shown."""
    prompts: list[str] = []
    replies: Iterator[str] = iter(answers)

    def fake_getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return next(replies)

    monkeypatch.setattr(sys, "stdin", FakeStdin(tty=True))
    monkeypatch.setattr(cli.getpass, "getpass", fake_getpass)
    return prompts


def test_hash_password_from_pipe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fast_hash: None
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("s3cret pass\nsecond line\n"))
    assert cli.main(["hash-password"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    encoded = out.strip()
    assert out == encoded + "\n"
    assert encoded.startswith("$scrypt$")
    assert verify_password("s3cret pass", encoded)
    assert not verify_password("s3cret pass\n", encoded)


def test_hash_password_default_parameters(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("pw\r\n"))
    assert cli.main(["hash-password"]) == 0
    encoded = capsys.readouterr().out.strip()
    assert encoded.startswith("$scrypt$ln=15,r=8,p=1$")
    assert verify_password("pw", encoded)


def test_hash_password_without_newline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fast_hash: None
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("  spaces kept  "))
    assert cli.main(["hash-password"]) == 0
    assert verify_password("  spaces kept  ", capsys.readouterr().out.strip())


def test_hash_password_refuses_what_is_no_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin("\udcff\udcfepass\n"))  # bytes, not UTF-8
    assert cli.main(["hash-password"]) == 2
    assert capsys.readouterr() == ("", "smtpbridge: the password is not UTF-8 text\n")
    monkeypatch.setattr(sys, "stdin", FakeStdin("x" * 100_000))  # read no further than 4 KiB
    assert cli.main(["hash-password"]) == 2
    assert capsys.readouterr() == ("", "smtpbridge: a password is at most 4096 characters\n")
    assert sys.stdin.read(1) == "x"


@pytest.mark.parametrize("text", ["", "\n", "\r\n"])
def test_hash_password_refuses_empty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(text))
    assert cli.main(["hash-password"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "smtpbridge: empty password refused\n"


def test_hash_password_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fast_hash: None
) -> None:
    prompts = terminal(monkeypatch, ["tty pass", "tty pass"])
    assert cli.main(["hash-password"]) == 0
    assert len(prompts) == 2
    assert verify_password("tty pass", capsys.readouterr().out.strip())


def test_hash_password_terminal_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal(monkeypatch, ["one", "two"])
    assert cli.main(["hash-password"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "smtpbridge: passwords do not match\n"


def test_hash_password_terminal_empty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal(monkeypatch, ["", ""])
    assert cli.main(["hash-password"]) == 2
    assert capsys.readouterr().err == "smtpbridge: empty password refused\n"


def test_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "hash-password" in capsys.readouterr().err


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "check" in out
    assert "hash-password" in out


def test_check_needs_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check"]) == 2
    assert "--config" in capsys.readouterr().err


def test_check_missing_file(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    path = f"{tmp_path}/missing.toml"
    assert cli.main(["check", "--config", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("smtpbridge: ")
    assert path in err
