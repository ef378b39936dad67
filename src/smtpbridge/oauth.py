"""OAuth2 access tokens for upstream XOAUTH2/OAUTHBEARER logins.

Three grants (a refresh token kept in a file and rotated, client credentials with a
secret or a certificate assertion, a token file maintained by another tool) behind a
cache that shares one request among concurrent callers and renews a token a margin
before it expires; a keepalive service refreshes accounts left idle, so their refresh
tokens do not die unused.  The client secret, refresh token, assertion, access token and
proxy credentials never appear in a log line, a reply or an exception.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attr
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.errors import TokenError
from smtpbridge.interfaces import ITokenSource
from smtpbridge.oauthconfig import DEFAULT_REFRESH_MARGIN, OAuthSettings, proxy_name
from smtpbridge.oauthwire import (
    client_assertion,
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
DEFAULT_EXPIRES_IN = 3600
TOKEN_FILE_REUSE = 300.0  # seconds a token read from a token file is used before re-reading
KEEPALIVE_RETRY = 3600.0  # seconds before a failed keepalive refresh is tried again


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
                 margin: float = DEFAULT_REFRESH_MARGIN) -> None:
        self._fetch = fetch
        self._clock = clock
        self._margin = margin
        self._token: Token | None = None
        self._refresh_at = 0.0
        self._waiters: list[Deferred[str]] | None = None
        self.fetched_at: float | None = None  # when the last fetch succeeded
        self.observe: Callable[[bool], object] | None = None  # hears of each fetch's result

    def refresh(self) -> Deferred[str]:
        """A new token even if the cached one is still good (or the fetch under way)."""
        if self._waiters is None:
            self._token = None
        return self.token()

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
        self.fetched_at = self._clock.seconds()
        if self.observe is not None:
            self.observe(True)
        lifetime = max(token.expires_at - self.fetched_at, 0.0)
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
        if self.observe is not None:
            self.observe(False)
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.errback(failure)


class TokenEndpoint:
    """Posts form requests to one token endpoint and reads its JSON answer."""

    def __init__(self, url: str, client_id: str, reactor: Any, client: HTTPClient,
                 timeout: float, proxy: str | None = None) -> None:
        self.url = url
        self.host = endpoint_host(url)
        self.client_id = client_id
        self._reactor = reactor
        self._client = client
        self._timeout = timeout
        self._through = f" through the proxy {proxy_name(proxy)}" if proxy else ""

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
        log.info("OAuth2 token for {client_id} from {host}: expires in {expires_in} s{through}",
                 client_id=self.client_id, host=self.host, expires_in=expires_in,
                 through=self._through)
        rotated = data.get("refresh_token")
        return (Token(access_token, self._reactor.seconds() + expires_in),
                rotated if isinstance(rotated, str) and rotated else None)


class EndpointGrant:
    """The refresh_token and client_credentials grants, asking a token endpoint.

    A refresh token is read from its file for each request; a rotated one is saved back.
    Should saving fail, the new one is used from memory for as long as the file still
    holds the one it replaced.  The client authenticates with its secret, or with an
    assertion signed by its certificate's key (either grant: Entra wants it from a
    confidential client for refresh tokens too), or not at all (a public client).  The
    certificate and key are read for each assertion, so renewed files are picked up.
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
        if settings.client_certificate is not None:
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
                 margin: float | None = None) -> CachedTokenSource:
    """The cached token source for C{settings} (complete: checked by the configuration).
    The endpoint is asked through C{agent} (default: an Agent verifying its certificate
    against C{settings.ca_certificates} or the system store, through C{settings.proxy}).
    Tokens are renewed C{margin} seconds before they expire (default: the account's
    refresh_margin); a token file is re-read every five minutes instead.  Raises
    ValueError for an unreadable CA bundle."""
    if settings.grant == "token_file":
        assert settings.token_file is not None
        return CachedTokenSource(TokenFileGrant(settings.token_file, reactor).fetch,
                                 reactor, margin=0.0)
    assert settings.token_url is not None and settings.client_id is not None
    if agent is None:
        try:
            client = https_client(reactor, settings.ca_certificates, settings.timeout,
                                  settings.proxy)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {settings.ca_certificates}: {reason(e)}")
    else:
        client = HTTPClient(agent)
    endpoint = TokenEndpoint(settings.token_url, settings.client_id, reactor, client,
                             settings.timeout, settings.proxy)
    return CachedTokenSource(EndpointGrant(settings, endpoint, reactor).fetch, reactor,
                             margin=settings.refresh_margin if margin is None else margin)


class TokenKeepalive(Service):
    """Refreshes the token of each ``refresh_token`` account that fetched none for its
    keepalive_interval, so that its refresh token stays in use: Microsoft drops one unused
    for 90 days, Google one unused for six months, and a device that mails once a quarter
    would then find it dead.  Idle time counts from the refresh token file's last change
    (a login or a rotation) when the bridge starts.  Every refresh is logged; a failure
    too, and it is tried again an hour later; nothing it does stops the bridge."""

    name = "oauth keepalive"

    def __init__(self, accounts: Mapping[str, tuple[CachedTokenSource, float, str]],
                 clock: IReactorTime) -> None:
        self._accounts = dict(accounts)  # name: (source, interval, refresh token file)
        self._clock = clock
        self._calls: dict[str, IDelayedCall] = {}

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()  # type: ignore[no-untyped-call]
        for name, (_source, interval, path) in sorted(self._accounts.items()):
            try:
                idle = max(time.time() - os.stat(path).st_mtime, 0.0)
            except OSError:
                idle = 0.0
            log.info("OAuth2 keepalive for account {account}: its token is refreshed after "
                     "{interval} without use", account=name, interval=_duration(interval))
            self._schedule(name, interval - idle)

    def stopService(self) -> Deferred[None] | None:  # noqa: N802 - Twisted's name
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        return super().stopService()  # type: ignore[no-untyped-call, no-any-return]

    def _schedule(self, name: str, delay: float) -> None:
        if self.running:
            self._calls[name] = self._clock.callLater(max(delay, 0.0), self._due, name)

    def _due(self, name: str) -> None:
        source, interval, _path = self._accounts[name]
        last = source.fetched_at
        if last is not None and self._clock.seconds() - last < interval:
            self._schedule(name, last + interval - self._clock.seconds())
            return
        log.info("OAuth2 keepalive: account {account} fetched no token for {interval}; "
                 "refreshing", account=name, interval=_duration(interval))

        def done(_: str) -> None:
            log.info("OAuth2 keepalive: account {account} refreshed", account=name)
            self._schedule(name, interval)

        def failed(failure: Failure) -> None:
            text = failure.value.reply.text if isinstance(failure.value, TokenError) \
                else type(failure.value).__name__
            log.warn("OAuth2 keepalive: account {account} not refreshed ({text}); trying "
                     "again in {retry}", account=name, text=text,
                     retry=_duration(min(interval, KEEPALIVE_RETRY)))
            self._schedule(name, min(interval, KEEPALIVE_RETRY))

        source.refresh().addCallbacks(done, failed)


def _duration(seconds: float) -> str:
    """C{seconds} for a log line: "1 day", "7 days", "3600 s"."""
    if seconds < 86400:
        return f"{seconds:g} s"
    return f"{seconds / 86400:g} day" + ("" if seconds == 86400 else "s")


def token_keepalive(settings: Mapping[str, OAuthSettings], sources: Mapping[str, ITokenSource],
                    clock: IReactorTime) -> TokenKeepalive:
    """The keepalive service for every account of C{settings} (by name) that has a refresh
    token and a keepalive_interval, using its token source of C{sources}."""
    accounts: dict[str, tuple[CachedTokenSource, float, str]] = {}
    for name, oauth in settings.items():
        source = sources.get(name)
        if oauth.grant == "refresh_token" and oauth.keepalive_interval > 0 and \
                isinstance(source, CachedTokenSource):
            accounts[name] = (source, oauth.keepalive_interval, str(oauth.refresh_token_file))
    return TokenKeepalive(accounts, clock)
