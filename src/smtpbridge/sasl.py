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


# The bridge as a client of the upstream: building responses.

PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")
OAUTH_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
OAUTHBEARER_ERROR_ACK = base64.b64encode(b"\x01").decode()  # RFC 7628 3.2.3


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def plain_response(username: str, password: str) -> str:
    """The PLAIN initial response (RFC 4616), base64."""
    return b64(f"\0{username}\0{password}")


def xoauth2_response(username: str, token: str) -> str:
    """Google's and Microsoft's XOAUTH2 initial response, base64."""
    return b64(f"user={username}\x01auth=Bearer {token}\x01\x01")


def oauthbearer_response(username: str, token: str, host: str, port: int) -> str:
    """The OAUTHBEARER initial response (RFC 7628), base64."""
    return b64(f"n,a={gs2_name(username)},\x01host={host}\x01port={port}\x01"
               f"auth=Bearer {token}\x01\x01")


def gs2_name(username: str) -> str:
    """C{username} as a GS2 header's saslname (RFC 5801, used by RFC 7628): "=" becomes
    "=3D" and "," becomes "=2C", since a "," would end the authorization identity."""
    return username.replace("=", "=3D").replace(",", "=2C")


def choose_mechanism(offered: list[str], wanted: str, oauth: bool) -> str | None:
    """The mechanism to use: C{wanted} if offered, or with "auto" the first offered of
    XOAUTH2, OAUTHBEARER (tokens) or PLAIN, LOGIN (passwords)."""
    candidates = (OAUTH_MECHANISMS if oauth else PASSWORD_MECHANISMS) if wanted == "auto" \
        else (wanted.upper(),)
    return next((m for m in candidates if m in offered), None)


def oauth_error(challenge: str) -> str:
    """Readable words for the JSON error a server sends as a 334 challenge after a refused
    token, e.g. ``status 401, schemes bearer``."""
    import json

    try:
        data = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except ValueError:
        return "no details"
    if not isinstance(data, dict):
        return "no details"
    return ", ".join(f"{key} {data[key]}" for key in ("status", "schemes", "scope")
                     if key in data) or "no details"
