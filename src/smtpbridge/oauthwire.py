"""The OAuth2 wire: HTTPS form posts to token endpoints (directly or through an HTTP
proxy's CONNECT tunnel) whose answers are read up to a size limit, readable error texts
with secrets hidden, the token files, signed client assertions.  The token sources and
the login command share it."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import uuid
from collections.abc import Iterable
from contextlib import suppress
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from smtpbridge.oauthconfig import proxy_name
from smtpbridge.secret import read_secret_file
from smtpbridge.tls import load_certificates

DETAIL_LIMIT = 200
ASSERTION_LIFETIME = 600
PROXY_ANSWER_LIMIT = 16384  # bytes of a proxy's answer to CONNECT, headers included
ANSWER_LIMIT = 65536  # bytes of a token endpoint's answer body; a token answer is a few KiB


def https_client(reactor: Any, ca_certificates: str | None, timeout: float,
                 proxy: str | None = None) -> HTTPClient:
    """A treq client that verifies endpoints against C{ca_certificates} (a PEM bundle) or
    the system store, through the HTTP C{proxy} (http://[USER:PASSWORD@]HOST:PORT) if
    given.  Raises OSError or ValueError for an unusable bundle."""
    trust = None
    if ca_certificates is not None:
        trust = trustRootFromCertificates(load_certificates(ca_certificates))
    policy = BrowserLikePolicyForHTTPS(trustRoot=trust)
    if proxy is None:
        return HTTPClient(Agent(reactor, contextFactory=policy, connectTimeout=timeout))
    tunnels = TunnelEndpointFactory(reactor, proxy, policy, timeout)
    return HTTPClient(Agent.usingEndpointFactory(reactor, tunnels))


class ProxyError(Exception):
    """The proxy did not open the tunnel; the text names it by HOST:PORT only."""


@implementer(IAgentEndpointFactory)
class TunnelEndpointFactory:
    """Endpoints for https:// URLs through an HTTP proxy: TCP to the proxy, ``CONNECT
    host:port`` (RFC 9110 9.3.6), then TLS with the endpoint itself, its certificate
    verified for its own host name.  The proxy sees only the host and port."""

    def __init__(self, reactor: Any, proxy: str, policy: IPolicyForHTTPS,
                 timeout: float) -> None:
        parts = urlsplit(proxy)
        self._reactor = reactor
        self._host, self._port = str(parts.hostname), int(parts.port or 0)
        self.name = proxy_name(proxy)
        self._authorization: bytes | None = None
        if parts.username is not None:  # RFC 7617 Basic
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._authorization = b"Basic " + base64.b64encode(pair.encode("utf-8"))
        self._policy = policy
        self._timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:  # noqa: N802 - the interface
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"only https:// through a proxy, not {uri.scheme!r}")
        target = uri.host.decode("ascii")
        target = f"[{target}]" if ":" in target and not target.startswith("[") else target
        request = [f"CONNECT {target}:{uri.port} HTTP/1.1".encode("ascii"),
                   f"Host: {target}:{uri.port}".encode("ascii")]
        if self._authorization is not None:
            request.append(b"Proxy-Authorization: " + self._authorization)
        proxy = HostnameEndpoint(self._reactor, self._host, self._port, timeout=self._timeout)
        tunnel = TunnelEndpoint(proxy, b"\r\n".join(request) + b"\r\n\r\n", self.name)
        return wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), tunnel)


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connects through the proxy reached by C{proxy}: its protocol is connected once the
    proxy answered C{request} (a CONNECT) with 2xx."""

    def __init__(self, proxy: IStreamClientEndpoint, request: bytes, name: str) -> None:
        self._proxy = proxy
        self._request = request
        self._name = name

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def build() -> TunnelProtocol:
            return TunnelProtocol(self._request, factory, self._name)

        def unreachable(failure: Failure) -> Failure:
            if failure.check(CancelledError):
                return failure
            raise ProxyError(f"the proxy {self._name} is unreachable: "
                             f"{clip(str(failure.value) or type(failure.value).__name__)}")

        tunnels = Factory.forProtocol(build)
        tunnels.noisy = False  # no "Starting factory" line for every token request
        connected: Deferred[Any] = self._proxy.connect(tunnels)
        connected.addErrback(unreachable)
        return connected.addCallback(lambda tunnel: tunnel.established)


class TunnelProtocol(Protocol):
    """Sends the CONNECT request, reads the proxy's answer, then hands the connection to
    the protocol of C{factory} (the TLS layer) and passes every byte through."""

    def __init__(self, request: bytes, factory: IProtocolFactory, name: str) -> None:
        self._request = request
        self._factory = factory
        self._name = name
        self._answer = b""
        self._inner: IProtocol | None = None
        self.established: Deferred[IProtocol] = Deferred(lambda _: self._abort())

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.transport.write(self._request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._answer += data
        head, found, rest = self._answer.partition(b"\r\n\r\n")
        if not found:
            if len(self._answer) > PROXY_ANSWER_LIMIT:
                self._fail("answered CONNECT with no end of headers")
            return
        status = head.split(b"\r\n", 1)[0].decode("latin-1").split(None, 2)
        if len(status) < 2 or not status[0].startswith("HTTP/") or \
                not (status[1].isascii() and status[1].isdigit() and 200 <= int(status[1]) < 300):
            self._fail(f"refused the tunnel: {clip(' '.join(status[1:]) or 'no status', 60)}")
            return
        inner = self._factory.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        if inner is None:
            self._fail("tunnel open but nothing to connect")
            return
        self._inner = inner
        inner.makeConnection(self.transport)  # type: ignore[arg-type]
        self.established.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if self._inner is not None:
            self._inner.connectionLost(reason or Failure(ConnectionDone()))
        elif not self.established.called:
            self.established.errback(ProxyError(
                f"the proxy {self._name} closed the connection before the tunnel was open"))

    def _fail(self, why: str) -> None:
        if not self.established.called:
            self.established.errback(ProxyError(f"the proxy {self._name} {why}"))
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


async def post_form(client: HTTPClient, reactor: Any, url: str,
                    form: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
    """POST C{form} to C{url}: the status code and the answer's JSON object (None when the
    answer is not one)."""
    headers: dict[bytes | str, bytes | str] = {"Accept": "application/json"}
    response = await client.post(url, data=form, headers=headers, allow_redirects=False,
                                 reactor=reactor, unbuffered=True)
    body = await read_answer(response)
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        data = None
    return response.code, data if isinstance(data, dict) else None


class AnswerTooLarge(Exception):
    """The endpoint's answer was longer than allowed; the connection was dropped."""


def read_answer(response: IResponse, limit: int = ANSWER_LIMIT) -> Deferred[bytes]:
    """The body of C{response}.  Should it grow beyond C{limit} bytes, it fails with
    L{AnswerTooLarge}; if it is cancelled (a timeout), it fails with CancelledError.
    Either way the connection is dropped at once, so nothing more is read."""
    reader = AnswerReader(limit, response.length)
    response.deliverBody(reader)
    return reader.done


class AnswerReader(Protocol):
    """Collects an answer's body up to C{limit} bytes (C{length}: the declared length, an
    int, or something else when unknown)."""

    def __init__(self, limit: int, length: object) -> None:
        self._limit = limit
        self._length = length
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._drop())

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        if isinstance(self._length, int) and self._length > self._limit:
            self._too_large()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._too_large()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if self.done.called:
            return
        if reason is not None and reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason or Failure(ConnectionDone()))

    def _too_large(self) -> None:
        self._chunks = []
        self.done.errback(AnswerTooLarge(f"answer too large (over {self._limit} bytes)"))
        self._drop()

    def _drop(self) -> None:
        """Close the connection now: abort it if the transport can, else stop it (which
        for an HTTP answer closes the connection under it without reading more)."""
        if self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.stopProducing)()  # type: ignore[attr-defined]


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
    """Why the endpoint could not be asked: "unreachable: <reason>", "timed out", or
    why its answer was not read ("answer too large ...")."""
    error = failure.value
    wrapped = getattr(error, "reasons", None)  # ResponseFailed, RequestTransmissionFailed
    if isinstance(wrapped, list) and all(isinstance(r, Failure) for r in wrapped):
        reasons = [r for r in wrapped if not r.check(ConnectionDone, ConnectionLost)]
        error = (reasons or wrapped or [failure])[0].value
    if isinstance(error, ConnectTimeout):
        return "timed out"
    if isinstance(error, AnswerTooLarge):
        return str(error)
    if isinstance(error, SSL.Error):
        errors = error.args[0] if error.args and isinstance(error.args[0], list) else []
        reason = "; ".join(str(e[-1]) for e in errors if isinstance(e, tuple) and e)
        return f"unreachable: TLS failed: {clip(reason or type(error).__name__)}"
    return f"unreachable: {clip(str(error) or type(error).__name__)}"


def read_text(path: str) -> str:
    """The stripped text of a UTF-8 file, bounded as L{read_secret_file} reads it;
    OSError or ValueError, never with the content."""
    return read_secret_file(path).strip()


def write_atomically(path: str, text: str, owner: tuple[int, int] | None = None) -> None:
    """Replace C{path} by a file holding C{text}, mode 0600 (owned by C{owner}, a user and
    group ID, if given): a temporary file in the same directory, synced, then renamed over
    it, so a crash leaves the old or the new file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                     suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
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


def client_assertion(certificate: bytes, key: bytes, client_id: str, audience: str,
                     now: float) -> str:
    """A JWT client assertion signed RS256 with C{key}, valid for ten minutes from C{now}.

    Raises ValueError (with a reason that holds no key material) for unusable PEM data.
    """
    try:
        cert = x509.load_pem_x509_certificates(certificate)[0]
    except (ValueError, IndexError):
        raise ValueError("client_certificate holds no usable PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ValueError("client_key holds no usable unencrypted PEM private key") from None
    public_key = cert.public_key()
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ValueError("client_key is not an RSA private key")
    if not isinstance(public_key, rsa.RSAPublicKey) or \
            private_key.public_key().public_numbers() != public_key.public_numbers():
        raise ValueError("client_key does not belong to client_certificate")
    issued = int(now)
    header = {"alg": "RS256", "typ": "JWT",
              "x5t": _b64url(cert.fingerprint(hashes.SHA1())),  # noqa: S303 - a name only
              "x5t#S256": _b64url(cert.fingerprint(hashes.SHA256()))}
    claims = {"aud": audience, "iss": client_id, "sub": client_id, "jti": str(uuid.uuid4()),
              "nbf": issued, "iat": issued, "exp": issued + ASSERTION_LIFETIME}
    signing_input = f"{_b64url(_json(header))}.{_b64url(_json(claims))}"
    signature = private_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(),
                                 hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
