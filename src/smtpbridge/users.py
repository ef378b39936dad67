"""The local users file: scrypt password hashes and a twisted.cred checker.

Hashes use the modular crypt style of passlib's scrypt handler,
``$scrypt$ln=15,r=8,p=1$<salt>$<key>`` with unpadded standard base64, so
hashes made by either tool are accepted by the other.

scrypt costs about 130 ms of CPU and 32 MiB per check, and devices log in for every
message; L{VerifiedLogins} remembers, for an hour, an HMAC (keyed with a random key of
the process) of each password that was verified, never the password, never a failure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import attr
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smtpbridge.errors import ConfigError
from smtpbridge.interfaces import IPasswordChecker, IVerifiedLogins

SALT_SIZE = 16
KEY_SIZE = 32

# Limits on parameters read from a hash, so a hostile or mistyped users file
# cannot make one login attempt take gigabytes of memory or minutes of CPU.
MAX_LOG_N = 20
MAX_R = 32
MAX_P = 16
MAX_MEMORY = 256 * 1024 * 1024
MAX_SALT_SIZE = 64
MIN_KEY_SIZE = 16
MAX_KEY_SIZE = 64


@attr.frozen
class _ScryptHash:
    """A parsed ``$scrypt$`` hash."""

    log_n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    """Decode unpadded standard base64 strictly (passlib's '.' for '+' is accepted too)."""
    if "=" in text:
        raise ValueError("padding is not allowed")
    text = text.replace(".", "+")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as e:
        raise ValueError(str(e))


def _maxmem(n: int, r: int, p: int) -> int:
    """Memory OpenSSL needs for these parameters, with some room to spare."""
    return 128 * r * (n + 2) + 128 * r * p + 1024 * 1024


def _parse_param(field: str, name: str) -> int:
    key, sep, value = field.partition("=")
    if key != name or not sep or not value.isdigit() or len(value) > 6:
        raise ValueError(f"expected {name}=<number>")
    return int(value)


def _parse_hash(encoded: str) -> _ScryptHash:
    """Parse and bound-check a ``$scrypt$`` hash; ValueError when it is not one."""
    if not isinstance(encoded, str):
        raise ValueError("not a string")
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "scrypt":
        raise ValueError("not a $scrypt$ hash")
    fields = parts[2].split(",")
    if len(fields) != 3:
        raise ValueError("expected ln=, r= and p= parameters")
    log_n = _parse_param(fields[0], "ln")
    r = _parse_param(fields[1], "r")
    p = _parse_param(fields[2], "p")
    if not 1 <= log_n <= MAX_LOG_N or not 1 <= r <= MAX_R or not 1 <= p <= MAX_P:
        raise ValueError("scrypt parameters out of range")
    if _maxmem(2**log_n, r, p) > MAX_MEMORY:
        raise ValueError("scrypt parameters need too much memory")
    salt = _b64decode(parts[3])
    key = _b64decode(parts[4])
    if not 1 <= len(salt) <= MAX_SALT_SIZE:
        raise ValueError("bad salt length")
    if not MIN_KEY_SIZE <= len(key) <= MAX_KEY_SIZE:
        raise ValueError("bad key length")
    return _ScryptHash(log_n, r, p, salt, key)


def _derive(password: str, salt: bytes, n: int, r: int, p: int, size: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_maxmem(n, r, p),
        dklen=size,
    )


def hash_password(
    password: str, *, salt: bytes | None = None, n: int = 2**15, r: int = 8, p: int = 1
) -> str:
    """Hash a password for the users file with scrypt and a fresh random salt."""
    if n < 2 or n & (n - 1):
        raise ValueError("n must be a power of 2 greater than 1")
    if salt is None:
        salt = os.urandom(SALT_SIZE)
    key = _derive(password, salt, n, r, p, KEY_SIZE)
    log_n = n.bit_length() - 1
    return f"$scrypt$ln={log_n},r={r},p={p}${_b64encode(salt)}${_b64encode(key)}"


def is_valid_hash(encoded: str) -> bool:
    """True when C{encoded} is a usable ``$scrypt$`` hash."""
    try:
        _parse_hash(encoded)
    except ValueError:
        return False
    return True


def verify_password(password: str, encoded: str) -> bool:
    """True when C{password} matches C{encoded}; a malformed hash never matches."""
    try:
        parsed = _parse_hash(encoded)
    except ValueError:
        return False
    try:
        key = _derive(password, parsed.salt, 2**parsed.log_n, parsed.r, parsed.p, len(parsed.key))
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(key, parsed.key)


def load_users(path: str) -> dict[str, str]:
    """Read a users file of ``name:hash`` lines into a name -> hash mapping.

    Errors name the file and line but never echo a line's content, which may
    hold a hash or a password pasted by mistake.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read users file: {e.strerror or e}")
    except UnicodeDecodeError:
        raise ConfigError(path, None, "cannot read users file: not valid UTF-8")
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number}"
        name, sep, encoded = line.partition(":")
        name = name.strip()
        encoded = encoded.strip()
        if not sep:
            raise ConfigError(path, where, "expected 'name:hash' (no ':' found)")
        if not name:
            raise ConfigError(path, where, "empty user name")
        if name in users:
            raise ConfigError(path, where, f"duplicate user {name!r}")
        if not is_valid_hash(encoded):
            raise ConfigError(
                path,
                where,
                f"password hash of user {name!r} is not a valid $scrypt$ hash"
                " (make one with 'smtpbridge hash-password')",
            )
        users[name] = encoded
    return users


class VerifiedLogins:
    """User name -> keyed hash of the password last verified for it, for C{ttl} seconds.

    The key is random and lives in this process only, so what is kept cannot be checked
    against a password anywhere else; only successful logins are added.  Entries expire
    C{ttl} seconds after the verification, whatever the use meanwhile.
    """

    def __init__(self, clock: IReactorTime, ttl: float = 3600.0) -> None:
        self._clock = clock
        self._ttl = ttl
        self._key = secrets.token_bytes(32)
        self._entries: dict[str, tuple[bytes, float]] = {}

    def _digest(self, username: str, password: str) -> bytes:
        message = username.encode("utf-8", "surrogatepass") + b"\0" + \
            password.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def remembers(self, username: str, password: str) -> bool:
        entry = self._entries.get(username)
        if entry is None:
            return False
        digest, until = entry
        if self._clock.seconds() >= until:
            del self._entries[username]
            return False
        return hmac.compare_digest(digest, self._digest(username, password))

    def remember(self, username: str, password: str) -> None:
        """C{password} was just verified for C{username}."""
        self._entries[username] = (self._digest(username, password),
                                   self._clock.seconds() + self._ttl)

    def clear(self) -> None:
        """Forget everything (the users changed)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


@implementer(IPasswordChecker, IVerifiedLogins, ICredentialsChecker)
class UsersFileChecker:
    """Checks passwords against the users of a users file.

    ``run_blocking(f, *args)`` runs the CPU-heavy scrypt and returns a
    Deferred; the service hands in a thread pool runner so the reactor is not
    blocked.  With C{cache}, a password verified a short while ago is taken
    without scrypt; the cache lives as long as the checker, and so as long as
    the users it was loaded with.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        users: Mapping[str, str],
        run_blocking: Callable[..., Deferred[Any]] = maybeDeferred,
        cache: VerifiedLogins | None = None,
    ) -> None:
        self._users = dict(users)
        self._run_blocking = run_blocking
        self._cache = cache
        self._dummy: str | None = None

    def _dummy_hash(self) -> str:
        """A hash no password matches, with the same cost as the users' hashes.

        Unknown names are checked against it so response times do not reveal
        which names exist.
        """
        if self._dummy is None:
            n, r, p = 2**15, 8, 1
            for encoded in self._users.values():
                try:
                    parsed = _parse_hash(encoded)
                except ValueError:
                    continue
                n, r, p = 2**parsed.log_n, parsed.r, parsed.p
                break
            self._dummy = hash_password(secrets.token_urlsafe(32), n=n, r=r, p=p)
        return self._dummy

    def _verify_unknown(self, password: str) -> bool:
        verify_password(password, self._dummy_hash())
        return False

    def remembers(self, username: str, password: str) -> bool:
        return self._cache is not None and username in self._users and \
            self._cache.remembers(username, password)

    def check(self, username: str, password: str) -> Deferred[bool]:
        """Fire with True when C{password} is the password of C{username}."""
        encoded = self._users.get(username)
        if encoded is None:
            return self._run_blocking(self._verify_unknown, password)
        if self.remembers(username, password):
            return succeed(True)
        cache = self._cache

        def verdict(ok: bool) -> bool:
            if ok and cache is not None:
                cache.remember(username, password)
            return ok

        checked: Deferred[bool] = self._run_blocking(verify_password, password, encoded)
        return checked.addCallback(verdict)

    def requestAvatarId(  # type: ignore[override]  # twisted.cred's avatar IDs are str too
            self, credentials: IUsernamePassword) -> Deferred[str]:
        """twisted.cred: fire with the user name, or fail with UnauthorizedLogin."""
        try:
            username = _text(credentials.username)
            password = _text(credentials.password)
        except UnicodeDecodeError:
            return fail(UnauthorizedLogin("credentials are not UTF-8"))

        def verdict(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin("bad user name or password")
            return username

        return self.check(username, password).addCallback(verdict)
