"""OAuth2 access tokens for upstream XOAUTH2/OAUTHBEARER logins.

Three grants (a refresh token kept in a file and rotated, client credentials with a
secret or a certificate assertion, a token file maintained by another tool) behind a
cache that shares one request among concurrent callers.  The client secret, refresh
token, assertion and access token never appear in a log line, a reply or an exception.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.errors import TokenError
from smtpbridge.interfaces import ITokenSource
from smtpbridge.oauthconfig import OAuthSettings
from smtpbridge.oauthwire import (
    clip,
    endpoint_host,
    error_text,
    https_client,
    post_form,
    read_text,
    reason,
    transport_detail,
    write_atomically,
)

log = Logger()

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 600
DEFAULT_EXPIRES_IN = 3600
TOKEN_FILE_REUSE = 300.0  # seconds a token read from a token file is used before re-reading


@attr.frozen
class Token:
    """An access token and when it expires, in seconds of the clock that fetched it."""

    access_token: str = attr.field(repr=False)
    expires_at: float


@implementer(ITokenSource)
class CachedTokenSource:
    """Caches the token of C{fetch} and shares one fetch among concurrent callers.

    A token obtained at time C{t} expiring at C{e} is reused while the clock is before
    C{e - min(margin, (e - t) / 10)}: normally up to C{margin} seconds before it expires,
    but never more than a tenth of its lifetime early, so short-lived tokens are reused
    too.  A failed fetch fails every waiting caller; the next call tries again.
    """

    def __init__(self, fetch: Callable[[], Deferred[Token]], clock: IReactorTime,
                 margin: float = 60.0) -> None:
        self._fetch = fetch
        self._clock = clock
        self._margin = margin
        self._token: Token | None = None
        self._refresh_at = 0.0
        self._waiters: list[Deferred[str]] | None = None

    def token(self) -> Deferred[str]:
        if self._token is not None and self._clock.seconds() < self._refresh_at:
            return succeed(self._token.access_token)
        waiter: Deferred[str] = Deferred()
        if self._waiters is not None:  # a fetch is under way: wait for it
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        maybeDeferred(self._fetch).addCallback(self._fetched).addErrback(self._failed)
        return waiter

    def invalidate(self, token: str) -> None:
        if self._token is not None and self._token.access_token == token:
            self._token = None

    def expires_at(self, token: str) -> float | None:
        if self._token is not None and self._token.access_token == token:
            return self._token.expires_at
        return None

    def _fetched(self, token: Token) -> None:
        lifetime = max(token.expires_at - self._clock.seconds(), 0.0)
        self._token = token
        self._refresh_at = token.expires_at - min(self._margin, lifetime / 10)
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.callback(token.access_token)

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, TokenError):  # a bug: its text is not shown, it might leak
            error = TokenError(f"OAuth2 token request failed: internal error "
                               f"({type(error).__name__})")
            failure = Failure(error)
        log.warn("{text}", text=error.reply.text)
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.errback(failure)


class TokenEndpoint:
    """Posts form requests to one token endpoint and reads its JSON answer."""

    def __init__(self, url: str, client_id: str, reactor: Any, client: HTTPClient,
                 timeout: float) -> None:
        self.url = url
        self.host = endpoint_host(url)
        self.client_id = client_id
        self._reactor = reactor
        self._client = client
        self._timeout = timeout

    def failed(self, detail: str) -> TokenError:
        return TokenError(f"OAuth2 token request to {self.host} failed: {detail}")

    def request(self, form: dict[str, str],
                secrets: Iterable[str]) -> Deferred[tuple[Token, str | None]]:
        """POST C{form}: the token and a rotated refresh token (or None).  Fails with
        L{TokenError}, any of C{secrets} hidden in its text."""
        exchange = Deferred.fromCoroutine(self._exchange(form, tuple(secrets)))

        def timed_out(result: tuple[Token, str | None] | Failure,
                      timeout: float) -> tuple[Token, str | None]:
            raise self.failed("timed out")

        def failed(failure: Failure) -> Failure:
            if failure.check(TokenError):
                return failure
            raise self.failed(transport_detail(failure))

        exchange.addErrback(failed)
        return exchange.addTimeout(self._timeout, self._reactor, onTimeoutCancel=timed_out)

    async def _exchange(self, form: dict[str, str],
                        secrets: tuple[str, ...]) -> tuple[Token, str | None]:
        code, data = await post_form(self._client, self._reactor, self.url, form)
        if data is None:
            raise self.failed(f"HTTP {code}")
        if "access_token" not in data and "error" in data:
            raise self.failed(error_text(data, secrets))
        if not 200 <= code < 300:
            raise self.failed(f"HTTP {code}")
        access_token = data.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise self.failed(f"HTTP {code} without an access_token")
        token_type = data.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise self.failed(f"unexpected token_type {clip(str(token_type), 30)!r}")
        try:  # a number or a numeric string
            expires_in = max(int(float(data.get("expires_in", DEFAULT_EXPIRES_IN))), 0)
        except (TypeError, ValueError, OverflowError):
            raise self.failed(f"invalid expires_in {clip(str(data['expires_in']), 30)!r}")
        log.info("OAuth2 token for {client_id} from {host}: expires in {expires_in} s",
                 client_id=self.client_id, host=self.host, expires_in=expires_in)
        rotated = data.get("refresh_token")
        return (Token(access_token, self._reactor.seconds() + expires_in),
                rotated if isinstance(rotated, str) and rotated else None)


class EndpointGrant:
    """The refresh_token and client_credentials grants, asking a token endpoint.

    A refresh token is read from its file for each request; a rotated one is saved back.
    Should saving fail, the new one is used from memory for as long as the file still
    holds the one it replaced.  A certificate and key are read for each assertion, so
    renewed files are picked up.
    """

    def __init__(self, settings: OAuthSettings, endpoint: TokenEndpoint,
                 clock: IReactorTime) -> None:
        self._settings = settings
        self._endpoint = endpoint
        self._clock = clock
        self._unsaved: tuple[str, str] | None = None  # (token in the file, token to use)

    def fetch(self) -> Deferred[Token]:
        return Deferred.fromCoroutine(self._fetch())

    async def _fetch(self) -> Token:
        settings = self._settings
        form = {"grant_type": settings.grant, "client_id": self._endpoint.client_id}
        if settings.scope:
            form["scope"] = settings.scope
        if settings.client_secret is not None:
            form["client_secret"] = settings.client_secret.value
        in_file = ""
        if settings.grant == "refresh_token":
            in_file = self._read(str(settings.refresh_token_file), "refresh token file ")
            unsaved = self._unsaved
            form["refresh_token"] = unsaved[1] if unsaved and unsaved[0] == in_file else in_file
        elif settings.client_secret is None:
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = self._assertion()
        token, rotated = await self._endpoint.request(form, [form.get(name, "") for name in (
            "client_secret", "refresh_token", "client_assertion")])
        if rotated is not None and settings.grant == "refresh_token" \
                and rotated != form["refresh_token"]:
            self._save(in_file, rotated)
        return token

    def _read(self, path: str, what: str = "") -> str:
        try:
            text = read_text(path)
        except (OSError, ValueError) as e:
            raise self._endpoint.failed(f"cannot read {what}{path}: {reason(e)}")
        if not text:
            raise self._endpoint.failed(f"{what}{path} is empty")
        return text

    def _save(self, in_file: str, rotated: str) -> None:
        path = str(self._settings.refresh_token_file)
        try:
            write_atomically(path, rotated + "\n")
        except OSError as e:
            self._unsaved = (in_file, rotated)
            log.error("OAuth2: cannot save the rotated refresh token to {path}: {reason}; "
                      "it is kept in memory only", path=path, reason=reason(e))
        else:
            self._unsaved = None

    def _assertion(self) -> str:
        pem = [self._read(str(path)).encode("utf-8") for path in (
            self._settings.client_certificate, self._settings.client_key)]
        try:
            return client_assertion(pem[0], pem[1], self._endpoint.client_id,
                                    self._endpoint.url, self._clock.seconds())
        except ValueError as e:
            raise self._endpoint.failed(str(e))


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


class TokenFileGrant:
    """An access token that another tool keeps fresh in a file."""

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self._path = path
        self._clock = clock
        self._last: str | None = None

    def fetch(self) -> Deferred[Token]:
        try:
            value = read_text(self._path)
        except (OSError, ValueError) as e:
            raise TokenError(f"OAuth2 token file {self._path} unusable: {reason(e)}")
        if not value:
            raise TokenError(f"OAuth2 token file {self._path} is empty")
        if value != self._last:
            log.info("OAuth2 token read from {path}", path=self._path)
            self._last = value
        return succeed(Token(value, self._clock.seconds() + TOKEN_FILE_REUSE))


def token_source(settings: OAuthSettings, reactor: Any, *, agent: Any = None,
                 margin: float = 60.0) -> CachedTokenSource:
    """The cached token source for C{settings} (complete: checked by the configuration).
    The endpoint is asked through C{agent} (default: an Agent verifying its certificate
    against C{settings.ca_certificates} or the system store).  A token file is re-read
    every five minutes, C{margin} does not apply to it.  Raises ValueError for an
    unreadable CA bundle."""
    if settings.grant == "token_file":
        assert settings.token_file is not None
        return CachedTokenSource(TokenFileGrant(settings.token_file, reactor).fetch,
                                 reactor, margin=0.0)
    assert settings.token_url is not None and settings.client_id is not None
    if agent is None:
        try:
            client = https_client(reactor, settings.ca_certificates, settings.timeout)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {settings.ca_certificates}: {reason(e)}")
    else:
        client = HTTPClient(agent)
    endpoint = TokenEndpoint(settings.token_url, settings.client_id, reactor, client,
                             settings.timeout)
    return CachedTokenSource(EndpointGrant(settings, endpoint, reactor).fetch, reactor,
                             margin=margin)
