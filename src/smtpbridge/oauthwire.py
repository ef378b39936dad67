"""What the OAuth2 token sources and the login command share: HTTPS form posts to
token endpoints, readable error texts with secrets hidden, the token files."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import treq
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.ssl import trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from smtpbridge.tls import load_certificates

DETAIL_LIMIT = 200


def https_client(reactor: Any, ca_certificates: str | None, timeout: float) -> HTTPClient:
    """A treq client that verifies endpoints against C{ca_certificates} (a PEM bundle) or
    the system store.  Raises OSError or ValueError for an unusable bundle."""
    trust = None
    if ca_certificates is not None:
        trust = trustRootFromCertificates(load_certificates(ca_certificates))
    return HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),
                            connectTimeout=timeout))


async def post_form(client: HTTPClient, reactor: Any, url: str,
                    form: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
    """POST C{form} to C{url}: the status code and the answer's JSON object (None when the
    answer is not one)."""
    headers: dict[bytes | str, bytes | str] = {"Accept": "application/json"}
    response = await client.post(url, data=form, headers=headers,
                                 allow_redirects=False, reactor=reactor)
    body = await treq.content(response)
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        data = None
    return response.code, data if isinstance(data, dict) else None


def endpoint_host(url: str) -> str:
    """The host (and port) of an endpoint URL, without user info, path or query."""
    return urlsplit(url).netloc.rpartition("@")[2]


def error_text(answer: dict[str, Any], hidden: Iterable[str]) -> str:
    """An OAuth2 error answer's error and error_description, C{hidden} values hidden."""
    hidden = tuple(hidden)
    error = clip(redact(str(answer["error"]), hidden), 60)
    description = clip(redact(str(answer.get("error_description") or ""), hidden))
    return f"{error}: {description}" if description else error


def clip(text: str, limit: int = DETAIL_LIMIT) -> str:
    """The first line of C{text}, at most C{limit} characters: fit for a reply."""
    lines = str(text).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first if len(first) <= limit else first[:limit - 3] + "..."


def redact(text: str, secrets: Iterable[str]) -> str:
    """C{text} with every occurrence of one of C{secrets} hidden."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<hidden>")
    return text


def transport_detail(failure: Failure) -> str:
    """Why the endpoint could not be asked: "unreachable: <reason>" or "timed out"."""
    error = failure.value
    wrapped = getattr(error, "reasons", None)  # ResponseFailed, RequestTransmissionFailed
    if isinstance(wrapped, list) and all(isinstance(r, Failure) for r in wrapped):
        reasons = [r for r in wrapped if not r.check(ConnectionDone, ConnectionLost)]
        error = (reasons or wrapped or [failure])[0].value
    if isinstance(error, ConnectTimeout):
        return "timed out"
    if isinstance(error, SSL.Error):
        errors = error.args[0] if error.args and isinstance(error.args[0], list) else []
        reason = "; ".join(str(e[-1]) for e in errors if isinstance(e, tuple) and e)
        return f"unreachable: TLS failed: {clip(reason or type(error).__name__)}"
    return f"unreachable: {clip(str(error) or type(error).__name__)}"


def read_text(path: str) -> str:
    """The stripped text of a UTF-8 file; OSError or ValueError, never with the content."""
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def write_atomically(path: str, text: str) -> None:
    """Replace C{path} by a file holding C{text}, mode 0600: a temporary file in the same
    directory, synced, then renamed over it, so a crash leaves the old or the new file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                     suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
    with suppress(OSError):  # make the rename itself durable
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


def reason(error: Exception) -> str:
    """Why a file could not be used, without its content."""
    if isinstance(error, UnicodeDecodeError):  # its text would show a byte of the file
        return "not UTF-8 text"
    return getattr(error, "strerror", None) or str(error)
