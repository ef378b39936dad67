"""The two ways an administrator signs in for ``smtpbridge oauth-login``: the device
code flow (RFC 8628) and the authorization code flow with PKCE (RFC 7636) and a loopback
redirect (RFC 8252), with the form posts to the provider's endpoints they share.
Neither the refresh token nor the access token is ever printed.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import secrets
import sys
from contextlib import suppress
from typing import Any
from urllib.parse import quote, urlencode

import attr
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as WaitTimeout
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from smtpbridge.oauthwire import (
    endpoint_host,
    error_text,
    https_client,
    post_form,
    reason,
    transport_detail,
)
from smtpbridge.secret import Secret

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REQUEST_TIMEOUT = 30.0  # seconds for one request to an endpoint
CLOSE_WAIT = 2.0  # seconds the browser gets to receive its page before we exit
DEFAULT_INTERVAL = 5.0  # RFC 8628 section 3.2
# The loopback redirect server's bounds (a browser opens a few connections and sends a
# GET with no body; its request line and headers are bounded by twisted.web's 16 KiB).
REDIRECT_CONNECTIONS = 16  # connections at once; more are closed at once
REDIRECT_BODY = 16 * 1024  # bytes of a request's body, kept in memory; beyond, dropped
REDIRECT_IDLE = 30.0  # seconds a connection may stay silent


class LoginError(Exception):
    """The login failed; the text says why, never with a secret.  C{error}: the error code
    an endpoint answered with, if any."""

    def __init__(self, text: str, error: object = None) -> None:
        super().__init__(text)
        self.error = error if isinstance(error, str) else None


@attr.frozen
class LoginSettings:
    """What one login needs: the command line with the provider's defaults filled in."""

    flow: str  # device | code
    client_id: str
    client_secret: Secret | None
    scope: str
    refresh_token_file: str
    login_hint: str | None
    authorize_url: str | None
    token_url: str
    device_url: str | None
    extras: tuple[tuple[str, str], ...]
    ca_certificates: str | None
    timeout: float
    proxy: str | None = attr.field(default=None, repr=False)  # may carry credentials
    owner: tuple[str, int, int] | None = None  # user name, user and group ID of the file


def say(text: str, stream: Any = None) -> None:
    """A line on standard output (or C{stream}) at once, without control characters (an
    endpoint chooses some of the text)."""
    print("".join(c if c.isprintable() else "?" for c in text), file=stream or sys.stdout,
          flush=True)


class FormPoster:
    """Posts forms to the login's HTTPS endpoints and reads their JSON answers.  The
    values in C{hidden} are hidden in any text taken from an answer."""

    def __init__(self, reactor: Any, settings: LoginSettings) -> None:
        try:
            self._client = https_client(reactor, settings.ca_certificates, REQUEST_TIMEOUT,
                                        settings.proxy)
        except (OSError, ValueError) as e:
            raise LoginError(f"cannot read {settings.ca_certificates}: {reason(e)}")
        self._reactor = reactor
        secret = settings.client_secret
        self.hidden: list[str] = [secret.value] if secret is not None else []

    async def post(self, what: str, url: str, form: dict[str, str]) -> dict[str, Any]:
        """POST C{form} to C{url}: the JSON object of a successful answer.  LoginError
        (C{what} request failed) for an error answer, with its error code, or none."""
        failed = f"{what} request to {endpoint_host(url)} failed"
        exchange = Deferred.fromCoroutine(post_form(self._client, self._reactor, url, form))
        try:
            code, data = await exchange.addTimeout(REQUEST_TIMEOUT, self._reactor)
        except WaitTimeout:
            raise LoginError(f"{failed}: timed out")
        except Exception:
            raise LoginError(f"{failed}: {transport_detail(Failure())}")
        if data is None:
            raise LoginError(f"{failed}: HTTP {code}, not a JSON object")
        if "error" in data:
            raise LoginError(f"{failed}: {error_text(data, self.hidden)}", data["error"])
        if not 200 <= code < 300:
            raise LoginError(f"{failed}: HTTP {code}")
        return data


def token_form(settings: LoginSettings, **fields: str) -> dict[str, str]:
    """A token request: C{fields}, the client ID and the client secret if there is one."""
    form = {**fields, "client_id": settings.client_id}
    if settings.client_secret is not None:
        form["client_secret"] = settings.client_secret.value
    return form


def seconds(value: object, default: float) -> float:
    """C{value} as a positive number of seconds (below a day), else C{default}."""
    with suppress(TypeError, ValueError, OverflowError):
        if 0 < (number := float(value)) < 86400:  # type: ignore[arg-type]
            return number
    return default


async def device_flow(reactor: Any, settings: LoginSettings,
                      poster: FormPoster) -> dict[str, Any]:
    """RFC 8628: show a code to enter on any device, poll the token endpoint meanwhile;
    the token answer."""
    data = await poster.post("device authorization", str(settings.device_url),
                             {"client_id": settings.client_id, "scope": settings.scope})
    device_code, user_code = data.get("device_code"), data.get("user_code")
    uri = data.get("verification_uri") or data.get("verification_url")  # Google's name
    if not (isinstance(device_code, str) and device_code and isinstance(user_code, str)
            and user_code and isinstance(uri, str) and uri):
        raise LoginError("the device authorization answer lacks device_code, user_code or "
                         "verification_uri")
    poster.hidden.append(device_code)
    interval = seconds(data.get("interval"), DEFAULT_INTERVAL)
    wait = min(settings.timeout, seconds(data.get("expires_in"), settings.timeout))
    say(f"To sign in, open {uri} and enter the code {user_code}")
    if isinstance(data.get("verification_uri_complete"), str):
        say(f"(or open {data['verification_uri_complete']}, which includes the code)")
    say(f"Waiting for the sign-in (up to {wait:.0f} s) ...")
    form = token_form(settings, grant_type=DEVICE_GRANT, device_code=device_code)
    deadline = reactor.seconds() + wait
    while True:  # (an interval the endpoint asks for does not outlast the wait)
        await deferLater(reactor, max(0.0, min(interval, deadline - reactor.seconds())),
                         lambda: None)
        try:
            return await poster.post("token", settings.token_url, form)
        except LoginError as e:
            if e.error not in ("authorization_pending", "slow_down"):
                raise
            if reactor.seconds() >= deadline:
                raise LoginError(f"no sign-in within {wait:.0f} s, nothing written")
            interval += 5 if e.error == "slow_down" else 0


def authorize_url(settings: LoginSettings, redirect_uri: str, state: str,
                  challenge: str) -> str:
    """The authorization request the browser opens."""
    params = [("response_type", "code"), ("client_id", settings.client_id),
              ("redirect_uri", redirect_uri), ("scope", settings.scope), ("state", state),
              ("code_challenge", challenge), ("code_challenge_method", "S256"),
              *settings.extras]
    if settings.login_hint:
        params.append(("login_hint", settings.login_hint))
    base = str(settings.authorize_url)
    return base + ("&" if "?" in base else "?") + urlencode(params, quote_via=quote)


def page(text: str) -> bytes:
    """A minimal HTML page saying C{text}."""
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>smtpbridge</title>"
            f"</head><body><p>{html.escape(text)}</p></body></html>\n").encode()


class RedirectResource(Resource):
    """The loopback redirect target: answers the browser's first authorization response
    (a request to / with a code or an error) and hands the code, or the reason there is
    none, to the waiting login."""

    isLeaf = True

    def __init__(self, reactor: Any, state: str, hidden: list[str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._reactor = reactor
        self._state = state
        self._hidden = hidden
        self.code: Deferred[str] = Deferred()

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web's name
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        args = {key.decode("utf-8", "replace"): values[0].decode("utf-8", "replace")
                for key, values in request.args.items() if values}
        if request.path != b"/" or ("code" not in args and "error" not in args):
            request.setResponseCode(404)
            return page("smtpbridge: not the sign-in's redirect")
        if self.code.called:
            request.setResponseCode(409)
            return page("smtpbridge: this sign-in is already over")
        try:
            result: str | Failure = self._code_of(args)
            text = "smtpbridge: signed in, you can close this window"
        except LoginError as e:
            result = Failure(e)
            request.setResponseCode(400)
            text = f"smtpbridge: sign-in failed: {e}"
        self._reactor.callLater(0, self._deliver, result)  # once this page is on its way
        return page(text)

    def _deliver(self, result: str | Failure) -> None:
        if not self.code.called:  # it may have timed out meanwhile
            self.code.errback(result) if isinstance(result, Failure) \
                else self.code.callback(result)

    def _code_of(self, args: dict[str, str]) -> str:
        if "error" in args:
            raise LoginError(f"the sign-in was refused: {error_text(args, self._hidden)}")
        if not secrets.compare_digest(args.get("state", "").encode(), self._state.encode()):
            raise LoginError("the redirect's state does not match this sign-in (a stale or "
                             "forged redirect), nothing written")
        if not args["code"]:
            raise LoginError("the redirect carries an empty code")
        return args["code"]


class _RedirectRequest(Request):
    """A request to the redirect server: its body is kept in memory, and a connection
    that sends more than L{REDIRECT_BODY} bytes of it is dropped."""

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - twisted.web's name
        self.content = self._body = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - twisted.web's name
        if self._body.tell() + len(data) > REDIRECT_BODY:
            channel: Any = self.channel
            channel.transport.abortConnection()
            return
        self._body.write(data)


class _RedirectConnections(WrappingFactory):
    """The redirect server's connections, at most L{REDIRECT_CONNECTIONS} at once (and
    known, to be closed when the sign-in is over)."""

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - twisted's name
        if len(self.protocols) >= REDIRECT_CONNECTIONS:
            return None  # closed at once
        return super().buildProtocol(addr)


def redirect_factory(reactor: Any, resource: Resource) -> WrappingFactory:
    """The loopback redirect server, with its bounds: connections, body, silence."""
    site = Site(resource, requestFactory=_RedirectRequest, timeout=REDIRECT_IDLE,
                reactor=reactor)
    return _RedirectConnections(site)  # type: ignore[no-untyped-call]


async def code_flow(reactor: Any, settings: LoginSettings,
                    poster: FormPoster) -> dict[str, Any]:
    """RFC 7636 + RFC 8252: the browser signs in, then is redirected to 127.0.0.1 here;
    the token answer."""
    verifier = secrets.token_urlsafe(64)  # 86 characters, RFC 7636 allows 43 to 128
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    state = secrets.token_urlsafe(24)
    poster.hidden.append(verifier)
    resource = RedirectResource(reactor, state, poster.hidden)
    factory = redirect_factory(reactor, resource)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        number = port.getHost().port
        redirect_uri = f"http://127.0.0.1:{number}/"
        url = authorize_url(settings, redirect_uri, state,
                            challenge.rstrip(b"=").decode("ascii"))
        say(f"Open this URL in a browser on this machine (or forward port {number}): {url}")
        say(f"Waiting for the sign-in (up to {settings.timeout:.0f} s) ...")
        try:
            code = await resource.code.addTimeout(settings.timeout, reactor)
        except WaitTimeout:
            raise LoginError(f"no sign-in within {settings.timeout:.0f} s, nothing written")
    finally:
        await close(reactor, port, factory)
    poster.hidden.append(code)
    say("Signed in; exchanging the authorization code ...")
    form = token_form(settings, grant_type="authorization_code", code=code,
                      redirect_uri=redirect_uri, code_verifier=verifier)
    return await poster.post("token", settings.token_url, form)


async def close(reactor: Any, port: Any, factory: WrappingFactory) -> None:
    """Stop listening; close the browser's connections once their pages are sent."""
    await port.stopListening()
    for protocol in list(factory.protocols):
        protocol.transport.loseConnection()  # after writing what is buffered
    waited = 0.0
    while factory.protocols and waited < CLOSE_WAIT:
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
