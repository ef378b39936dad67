"""SASL for downstream clients: the AUTH PLAIN and AUTH LOGIN exchanges (RFC 4954)."""

from __future__ import annotations

import base64
import binascii

import attr

SERVER_MECHANISMS = ("PLAIN", "LOGIN")
LOGIN_USERNAME_PROMPT = base64.b64encode(b"Username:").decode()
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()


class SASLError(ValueError):
    """A client response that cannot be decoded."""


class SASLCancelled(SASLError):
    """The client answered a challenge with ``*``."""


class UnknownMechanism(SASLError):
    """A mechanism the bridge does not offer."""


@attr.frozen
class Challenge:
    """Send ``334 <text>`` and wait for the client's next line."""

    text: str


@attr.frozen
class Credentials:
    """The exchange is complete: check these."""

    username: str
    password: str = attr.field(repr=False)


def decode_response(text: str) -> bytes:
    """Base64-decode one client response; ``=`` is the empty response (RFC 4954)."""
    text = text.strip()
    if text == "*":
        raise SASLCancelled("authentication cancelled")
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SASLError("cannot decode base64 response")


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError("response is not UTF-8")


def parse_plain(data: bytes) -> tuple[str, str]:
    """The username and password of a PLAIN response (RFC 4616).

    An authorization identity other than the user itself is refused: the
    bridge does not let one user act for another.
    """
    parts = data.split(b"\0")
    if len(parts) != 3:
        raise SASLError("malformed PLAIN response")
    authzid, authcid, password = (_text(part) for part in parts)
    if not authcid or (authzid and authzid != authcid):
        raise SASLError("malformed PLAIN response")
    return authcid, password


class ServerExchange:
    """One AUTH PLAIN or LOGIN exchange, driven by the client's lines."""

    def __init__(self, mechanism: str, initial: str) -> None:
        self.mechanism = mechanism.upper()
        if self.mechanism not in SERVER_MECHANISMS:
            raise UnknownMechanism(mechanism)
        self._initial = initial.strip()
        self._username: str | None = None

    def start(self) -> Challenge | Credentials:
        """The first step, using the initial response if the client sent one."""
        if self.mechanism == "PLAIN":
            return self.respond(self._initial) if self._initial else Challenge("")
        if self._initial:
            return self.respond(self._initial)
        return Challenge(LOGIN_USERNAME_PROMPT)

    def respond(self, line: str) -> Challenge | Credentials:
        """The client's answer to the last challenge."""
        data = decode_response(line)
        if self.mechanism == "PLAIN":
            return Credentials(*parse_plain(data))
        if self._username is None:
            self._username = _text(data)
            return Challenge(LOGIN_PASSWORD_PROMPT)
        return Credentials(self._username, _text(data))
