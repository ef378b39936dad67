"""SASL: decoding what downstream clients send for AUTH PLAIN and AUTH LOGIN."""

from __future__ import annotations

import base64
import binascii

SERVER_MECHANISMS = ("PLAIN", "LOGIN")
LOGIN_USERNAME_PROMPT = base64.b64encode(b"Username:").decode()
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()


class SASLError(ValueError):
    """A client response that cannot be decoded."""


def decode_response(text: str) -> bytes:
    """Base64-decode one client response; ``=`` is the empty response (RFC 4954)."""
    text = text.strip()
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


def parse_login_field(data: bytes) -> str:
    """A username or password sent in answer to an AUTH LOGIN prompt."""
    return _text(data)
