"""Tests for smtpbridge.users: hashing, the users file and the cred checker."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from smtpbridge import users
from smtpbridge.errors import ConfigError
from smtpbridge.interfaces import IPasswordChecker, IVerifiedLogins
from smtpbridge.users import (
    UsersFileChecker,
    VerifiedLogins,
    hash_password,
    load_users,
    verify_password,
)

FAST = 2**10


def result_of(d: Deferred[Any]) -> Any:
    """The result of an already fired Deferred (a Failure when it failed)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_password("correct horse", n=FAST)


def test_default_parameters_round_trip() -> None:
    encoded = hash_password("s3cret")
    assert encoded.startswith("$scrypt$ln=15,r=8,p=1$")
    _, _, _, salt, key = encoded.split("$")
    assert "=" not in salt + key
    assert len(base64.b64decode(salt + "==")) == 16
    assert len(base64.b64decode(key + "=")) == 32
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)


def test_known_vector() -> None:
    salt = b"0123456789abcdef"
    expected = hashlib.scrypt(b"pw", salt=salt, n=FAST, r=8, p=1, dklen=32)
    encoded = hash_password("pw", salt=salt, n=FAST)
    assert encoded == (
        "$scrypt$ln=10,r=8,p=1$"
        + base64.b64encode(salt).decode().rstrip("=")
        + "$"
        + base64.b64encode(expected).decode().rstrip("=")
    )


def test_random_salt(alice_hash: str) -> None:
    assert hash_password("correct horse", n=FAST) != alice_hash


def test_verify_good_and_bad(alice_hash: str) -> None:
    assert verify_password("correct horse", alice_hash)
    assert not verify_password("wrong horse", alice_hash)
    assert not verify_password("", alice_hash)


def test_non_ascii_password() -> None:
    encoded = hash_password("pässwörd ✓", n=FAST)
    assert verify_password("pässwörd ✓", encoded)
    assert not verify_password("passwort", encoded)
    assert not verify_password("\udc80", encoded)


def test_hash_password_rejects_bad_n() -> None:
    with pytest.raises(ValueError):
        hash_password("x", n=1000)


def _mangle(encoded: str, index: int, value: str) -> str:
    parts = encoded.split("$")
    parts[index] = value
    return "$".join(parts)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h: "",
        lambda h: "plaintext",
        lambda h: h.replace("$scrypt$", "$argon2$"),
        lambda h: h + "$extra",
        lambda h: h.rsplit("$", 1)[0],
        lambda h: _mangle(h, 2, "ln=10,r=8"),
        lambda h: _mangle(h, 2, "r=8,ln=10,p=1"),
        lambda h: _mangle(h, 2, "ln=x,r=8,p=1"),
        lambda h: _mangle(h, 2, "ln=0,r=8,p=1"),
        lambda h: _mangle(h, 2, "ln=40,r=8,p=1"),
        lambda h: _mangle(h, 2, "ln=20,r=32,p=1"),
        lambda h: _mangle(h, 2, "ln=10,r=8,p=-1"),
        lambda h: _mangle(h, 3, ""),
        lambda h: _mangle(h, 3, "!!!!"),
        lambda h: _mangle(h, 4, h.split("$")[4] + "=="),
        lambda h: _mangle(h, 4, "AAAA"),
    ],
)
def test_malformed_hash_never_matches(alice_hash: str, mangle: Callable[[str], str]) -> None:
    assert not verify_password("correct horse", mangle(alice_hash))


def test_verify_accepts_passlib_dot_alphabet() -> None:
    salt = b"\xfb\xef\xbe" * 5 + b"\x00"  # base64 full of '+'
    encoded = hash_password("pw", salt=salt, n=FAST)
    assert "+" in encoded.split("$")[3]
    assert verify_password("pw", _mangle(encoded, 3, encoded.split("$")[3].replace("+", ".")))


def test_verify_non_string_hash() -> None:
    assert not verify_password("pw", None)  # type: ignore[arg-type]


# -- load_users


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "users"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_load_users(tmp_path: Path, alice_hash: str) -> None:
    bob = hash_password("bob", n=FAST)
    path = write(
        tmp_path,
        f"# users of the bridge\n\n  \nalice:{alice_hash}\n  # comment\nbob@example.com:{bob}\n",
    )
    assert load_users(path) == {"alice": alice_hash, "bob@example.com": bob}


def test_load_users_empty_file(tmp_path: Path) -> None:
    assert load_users(write(tmp_path, "")) == {}


def test_load_users_crlf(tmp_path: Path, alice_hash: str) -> None:
    path = write(tmp_path, f"alice:{alice_hash}\r\n")
    assert load_users(path) == {"alice": alice_hash}


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        ("# c\nalice {h}\n", 2, "no ':' found"),
        ("\n:{h}\n", 2, "empty user name"),
        ("alice:{h}\nbob:{h}\nalice:{h}\n", 3, "duplicate user 'alice'"),
        ("alice:{h}x$\n", 1, "password hash of user 'alice' is not a valid $scrypt$ hash"),
        ("alice:plaintext-password\n", 1, "is not a valid $scrypt$ hash"),
        ("alice:\n", 1, "is not a valid $scrypt$ hash"),
    ],
)
def test_load_users_errors(
    tmp_path: Path, alice_hash: str, body: str, line: int, reason: str
) -> None:
    path = write(tmp_path, body.replace("{h}", alice_hash))
    with pytest.raises(ConfigError) as info:
        load_users(path)
    error = info.value
    assert error.file == path
    assert error.key == f"line {line}"
    assert reason in error.reason
    assert str(error).startswith(f"{path}: line {line}: ")
    assert alice_hash not in str(error)
    assert alice_hash.split("$")[4] not in str(error)
    assert "plaintext-password" not in str(error)


def test_load_users_name_split_at_first_colon(tmp_path: Path, alice_hash: str) -> None:
    # The hash part contains no ':', so "a:b:hash" means user "a" with hash "b:hash": invalid.
    path = write(tmp_path, f"a:b:{alice_hash}\n")
    with pytest.raises(ConfigError) as info:
        load_users(path)
    assert "user 'a'" in info.value.reason


def test_load_users_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as info:
        load_users(path)
    assert info.value.file == path
    assert info.value.key is None
    assert info.value.reason == "cannot read users file: No such file or directory"


def test_load_users_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"al\xffce:x\n")
    with pytest.raises(ConfigError) as info:
        load_users(str(path))
    assert info.value.reason.startswith("cannot read users file: ")


# -- the checker


class CountingRunner:
    """A run_blocking that runs synchronously and records what it ran."""

    def __init__(self) -> None:
        self.calls: list[Callable[..., Any]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append(f)
        return maybeDeferred(f, *args)


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of hashlib.scrypt made by smtpbridge.users."""
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(kwargs["n"])
        return real(*args, **kwargs)

    monkeypatch.setattr(users.hashlib, "scrypt", counting)
    return calls


def test_checker_provides_interfaces(alice_hash: str) -> None:
    checker = UsersFileChecker({"alice": alice_hash})
    assert verifyObject(IPasswordChecker, checker)
    assert verifyObject(ICredentialsChecker, checker)


def test_check_known_user(alice_hash: str, scrypt_calls: list[int]) -> None:
    runner = CountingRunner()
    checker = UsersFileChecker({"alice": alice_hash}, runner)
    assert result_of(checker.check("alice", "correct horse")) is True
    assert result_of(checker.check("alice", "wrong")) is False
    assert len(runner.calls) == 2
    assert scrypt_calls == [FAST, FAST]


def test_check_unknown_user_still_runs_scrypt(alice_hash: str, scrypt_calls: list[int]) -> None:
    runner = CountingRunner()
    checker = UsersFileChecker({"alice": alice_hash}, runner)
    assert result_of(checker.check("mallory", "correct horse")) is False
    assert len(runner.calls) == 1
    # The first unknown name also makes the dummy hash; it costs what a user's hash costs.
    assert scrypt_calls == [FAST, FAST]
    assert result_of(checker.check("eve", "")) is False
    assert len(runner.calls) == 2
    assert scrypt_calls == [FAST, FAST, FAST]


def test_check_without_users(scrypt_calls: list[int]) -> None:
    checker = UsersFileChecker({})
    assert result_of(checker.check("anyone", "pw")) is False
    assert scrypt_calls == [2**15, 2**15]


def test_request_avatar_id(alice_hash: str) -> None:
    checker = UsersFileChecker({"alice": alice_hash})
    assert result_of(checker.requestAvatarId(UsernamePassword(b"alice", b"correct horse"))) == (
        "alice"
    )
    assert result_of(checker.requestAvatarId(UsernamePassword("alice", "correct horse"))) == (
        "alice"
    )


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (b"alice", b"wrong"),
        ("alice", "wrong"),
        (b"mallory", b"correct horse"),
        (b"al\xffce", b"correct horse"),
        (b"alice", b"\xff"),
    ],
)
def test_request_avatar_id_unauthorized(
    alice_hash: str, username: bytes | str, password: bytes | str
) -> None:
    checker = UsersFileChecker({"alice": alice_hash})
    result = result_of(checker.requestAvatarId(UsernamePassword(username, password)))
    assert isinstance(result, Failure)
    assert result.check(UnauthorizedLogin)


def test_checker_does_not_share_users_mapping(alice_hash: str) -> None:
    mapping = {"alice": alice_hash}
    checker = UsersFileChecker(mapping)
    mapping.clear()
    assert result_of(checker.check("alice", "correct horse")) is True


# The verified-login cache.

def cached_checker(alice_hash: str, ttl: float = 3600.0,
                   ) -> tuple[UsersFileChecker, CountingRunner, Clock]:
    clock = Clock()
    runner = CountingRunner()
    return UsersFileChecker({"alice": alice_hash}, runner, VerifiedLogins(clock, ttl)), \
        runner, clock


def test_a_verified_password_is_taken_without_scrypt_for_the_ttl(alice_hash: str) -> None:
    checker, runner, clock = cached_checker(alice_hash, ttl=3600)
    assert verifyObject(IVerifiedLogins, checker)
    assert not checker.remembers("alice", "correct horse")
    assert result_of(checker.check("alice", "correct horse")) is True
    assert len(runner.calls) == 1
    clock.advance(3599)
    assert checker.remembers("alice", "correct horse")
    assert result_of(checker.check("alice", "correct horse")) is True
    assert len(runner.calls) == 1
    clock.advance(1)  # an hour after the check, whatever the use meanwhile
    assert not checker.remembers("alice", "correct horse")
    assert result_of(checker.check("alice", "correct horse")) is True
    assert len(runner.calls) == 2


def test_failed_logins_are_never_cached(alice_hash: str) -> None:
    checker, runner, _ = cached_checker(alice_hash)
    for _ in range(2):
        assert result_of(checker.check("alice", "wrong")) is False
        assert result_of(checker.check("mallory", "wrong")) is False
    assert len(runner.calls) == 4
    assert result_of(checker.check("alice", "correct horse")) is True
    # A remembered password lets no other one through, nor the same for another name.
    assert not checker.remembers("alice", "wrong")
    assert result_of(checker.check("alice", "wrong")) is False
    assert not checker.remembers("mallory", "correct horse")
    assert len(runner.calls) == 6


def test_the_cache_holds_no_password(alice_hash: str) -> None:
    cache = VerifiedLogins(Clock())
    other = VerifiedLogins(Clock())
    for each in (cache, other):
        each.remember("alice", "correct horse")
    [(digest, _)] = cache._entries.values()
    assert b"correct horse" not in digest and len(digest) == 32
    # Keyed per process (here: per cache): the digest is no use anywhere else.
    assert digest != next(iter(other._entries.values()))[0]
    assert digest != hashlib.sha256(b"alice\0correct horse").digest()
    cache.clear()
    assert len(cache) == 0 and not cache.remembers("alice", "correct horse")


def test_without_a_cache_every_login_runs_scrypt(alice_hash: str) -> None:
    runner = CountingRunner()
    checker = UsersFileChecker({"alice": alice_hash}, runner)
    for _ in range(3):
        assert result_of(checker.check("alice", "correct horse")) is True
    assert len(runner.calls) == 3 and not checker.remembers("alice", "correct horse")
