"""An OAuth2 provider for tests: a token endpoint and an SMTP upstream that share its tokens.

``start_provider(reactor, certificate, directory)`` starts both and returns a
L{Provider}:

- the token endpoint is twisted.web over HTTPS (the session's self-signed
  certificate) on 127.0.0.1, a free port, in the reactor thread.  It checks the
  client ID and secret (or, like Entra for a confidential client with a
  certificate, a signed client assertion) and the refresh token, issues access
  tokens with a chosen lifetime, may rotate the refresh token, forget refresh
  tokens left unused too long, delay its answers, or answer every request with an
  error; it records every request's form fields and can be stopped and started
  again on the same port;
- the upstream is aiosmtpd on 127.0.0.1 requiring STARTTLS, then AUTH, offering
  only XOAUTH2 and OAUTHBEARER.  It accepts a token only while the endpoint's
  record holds it unexpired and unrevoked, and only for the account's user.  A
  refused token gets the providers' 334 challenge (base64 JSON: status, schemes,
  scope); the client's answer (empty for XOAUTH2, ``\\x01`` for OAUTHBEARER) gets
  535.  Every login and every stored message is recorded.

Every secret the provider knows, issues or receives (client secret, refresh and
access tokens, the SASL responses carrying them) is added to L{SECRETS}, the set a
log scan looks for.

``start_proxy(directory)`` runs a real forward proxy (tinyproxy) on loopback, whose
log shows every CONNECT it tunnelled.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import threading
import time
from typing import Any

import attr
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from twisted.internet.threads import blockingCallFromThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from smtpbridge.tls import ServerTLS, server_context
from tests.upstream import write_ca_bundle, write_certificate

USERNAME = "scans@example.com"
CLIENT_ID = "000000000000-bridge.apps.googleusercontent.com"
GOOGLE_SCOPE = "https://mail.google.com/"
REJECTED = "535 5.7.8 Username and Password not accepted"
INVALID_GRANT = {"error": "invalid_grant",
                 "error_description": "Token has been expired or revoked."}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
NO_CREDENTIAL = {"error": "invalid_client",
                 "error_description": "AADSTS7000218: The request body must contain the "
                                      "following parameter: 'client_assertion' or "
                                      "'client_secret'."}
SECRETS: set[str] = set()  # everything secret: none may appear in a log line or a reply
_SECRETS_LOCK = threading.Lock()


def secret(kind: str) -> str:
    """A fresh secret value, registered in L{SECRETS}."""
    value = f"{kind}-{secrets.token_urlsafe(24)}"
    remember(value)
    return value


def remember(*values: str) -> None:
    """Add C{values} (and their base64 forms) to L{SECRETS}."""
    with _SECRETS_LOCK:
        for value in values:
            if value:
                SECRETS.add(value)
                SECRETS.add(base64.b64encode(value.encode()).decode())


def secrets_now() -> set[str]:
    with _SECRETS_LOCK:
        return set(SECRETS)


@attr.define
class Issued:
    """One access token the endpoint issued."""

    token: str = attr.field(repr=False)
    issued_at: float  # time.time()
    expires_at: float


@attr.define
class Login:
    """One AUTH exchange the upstream saw."""

    mechanism: str
    user: str
    token: str = attr.field(repr=False)
    accepted: bool
    answer: bytes | None = None  # the client's answer to the error challenge
    host: str | None = None  # OAUTHBEARER's host= and port=
    port: str | None = None
    at: float = 0.0  # time.time() of the verdict


class TokenResource(Resource):
    """The token endpoint at /token (runs in the reactor thread)."""

    isLeaf = True

    def __init__(self, provider: Provider, reactor: Any) -> None:
        super().__init__()
        self._provider = provider
        self._reactor = reactor

    def render_POST(self, request: Any) -> Any:  # noqa: N802 - twisted.web's name
        provider = self._provider
        form = {key.decode(): values[-1].decode() for key, values in request.args.items()}
        with provider.lock:
            provider.requests.append(form)
            delay = provider.delay
        request.setHeader(b"content-type", b"application/json")
        if delay:
            gone: list[bool] = []
            request.notifyFinish().addErrback(lambda _: gone.append(True))
            self._reactor.callLater(delay, self._finish, request, form, gone)
            return NOT_DONE_YET
        return self._answer(request, form)

    def _finish(self, request: Any, form: dict[str, str], gone: list[bool]) -> None:
        if not gone:  # the client may have given up waiting
            request.write(self._answer(request, form))
            request.finish()

    def _answer(self, request: Any, form: dict[str, str]) -> bytes:
        code, body = self._provider.answer(request.path, form)
        request.setResponseCode(code)
        return json.dumps(body).encode()


class _OAuthSMTP(SMTP):
    """aiosmtpd's server; the handler sees whether TLS is on."""

    @property
    def under_tls(self) -> bool:
        return self._tls_protocol is not None


class _Handler:
    """XOAUTH2 and OAUTHBEARER against the provider's tokens; stores messages."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    async def handle_EHLO(self, server: _OAuthSMTP, session: Any, envelope: Any,  # noqa: N802
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if server.under_tls:
            with self.provider.lock:
                self.provider.tls_sessions.append(time.time())
        return responses

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        fields = await self._initial(server, args)
        if fields is None:
            return AuthResult(success=False, handled=True)
        parts = dict(part.partition("=")[::2] for part in fields.split("\x01") if part)
        return await self._check(server, "XOAUTH2", parts.get("user", ""),
                                 parts.get("auth", ""), b"", args[1])

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        fields = await self._initial(server, args)
        if fields is None:
            return AuthResult(success=False, handled=True)
        gs2, _, rest = fields.partition("\x01")
        user = next((saslname(part[2:]) for part in gs2.split(",") if part.startswith("a=")),
                    "")
        parts = dict(part.partition("=")[::2] for part in rest.split("\x01") if part)
        if not gs2.startswith("n,"):
            user = ""  # channel binding is not offered: a wrong GS2 header
        return await self._check(server, "OAUTHBEARER", user, parts.get("auth", ""), b"\x01",
                                 args[1], parts.get("host"), parts.get("port"))

    async def _initial(self, server: SMTP, args: list[str]) -> str | None:
        """The initial response (the bridge always sends one) decoded, or None."""
        if len(args) != 2:
            await server.push("501 5.5.2 an initial response is required")
            return None
        remember(args[1])
        try:
            return base64.b64decode(args[1], validate=True).decode("utf-8")
        except ValueError:
            await server.push("501 5.5.2 Can't decode base64")
            return None

    async def _check(self, server: SMTP, mechanism: str, user: str, auth: str,
                     expected_answer: bytes, response: str, host: str | None = None,
                     port: str | None = None) -> AuthResult:
        provider = self.provider
        scheme, _, token = auth.partition(" ")
        ok = scheme == "Bearer" and user == provider.username and provider.valid(token)
        login = Login(mechanism, user, token, ok, host=host, port=port)
        if not ok:
            with provider.lock:
                delay = provider.reject_delays.pop(0) if provider.reject_delays else 0.0
            await asyncio.sleep(delay)
            challenge = json.dumps({"status": "401", "schemes": "bearer",
                                    "scope": GOOGLE_SCOPE}).encode()
            answer = await server.challenge_auth(challenge)
            login.answer = None if answer is MISSING else answer
        login.at = time.time()
        with provider.lock:
            provider.logins.append(login)
        if ok:
            return AuthResult(success=True, auth_data=user)
        if login.answer is None:
            return AuthResult(success=False, handled=True)  # challenge_auth answered
        if login.answer != expected_answer:
            return AuthResult(success=False, handled=False,
                              message="501 5.5.2 unexpected answer to the error challenge")
        return AuthResult(success=False, handled=False, message=provider.reject_reply)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:  # noqa: N802
        with self.provider.lock:
            self.provider.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                           bytes(envelope.original_content)))
        return "250 2.0.0 OK queued"


def saslname(text: str) -> str:
    """A GS2 saslname decoded (RFC 5801): "=2C" is ",", "=3D" is "="; any other "=" or a
    "," makes it malformed: ""."""
    if re.search(r"=(?!2C|3D)", text) or "," in text:
        return ""
    return text.replace("=2C", ",").replace("=3D", "=")


def verify_assertion(certificate: str, form: dict[str, str], audience: str) -> str | None:
    """What is wrong with the form's client assertion (an RS256 JWT signed by the key of
    C{certificate}, for C{audience}), or None."""
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        return "client_assertion_type missing"
    assertion = form.get("client_assertion", "")
    remember(assertion)
    with open(certificate, "rb") as f:
        public_key = x509.load_pem_x509_certificate(f.read()).public_key()
    try:
        header, claims, signature = assertion.split(".")
        public_key.verify(_unb64(signature), f"{header}.{claims}".encode(),
                          padding.PKCS1v15(), hashes.SHA256())
        audience_ok = json.loads(_unb64(claims)).get("aud") == audience
    except (ValueError, InvalidSignature):
        return "AADSTS700027: the client assertion's signature is invalid"
    return None if audience_ok else "AADSTS700027: wrong audience"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Controller(Controller):
    """A controller that listens on port 0 and builds L{_OAuthSMTP} servers."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()

    def factory(self) -> SMTP:
        return _OAuthSMTP(self.handler, **self.SMTP_kwargs)


@attr.define(eq=False)
class Provider:
    """The token endpoint and the upstream, and what they saw.  C{lock} guards the lists
    and settings (the reactor thread and aiosmtpd's thread use them)."""

    reactor: Any
    certificate: tuple[str, str]
    username: str
    client_id: str
    client_secret: str | None = attr.field(repr=False)
    refresh_tokens: set[str] = attr.field(repr=False)  # the ones the endpoint accepts
    ca_file: str = ""  # trusts the upstream's certificate
    # Endpoint settings (change them under the lock, or before traffic).
    expires_in: float = 3600
    rotate: bool = False  # every answer to a refresh brings a new refresh token
    # A confidential client with a certificate: each request must carry an assertion
    # signed by its key (no secret then).
    assertion_certificate: str | None = None
    # Seconds after which an unused refresh token is forgotten (Microsoft: 90 days).
    refresh_idle_limit: float | None = None
    refresh_used: dict[str, float] = attr.Factory(dict)  # refresh token: last use
    delay: float = 0.0  # seconds before each answer
    failure: tuple[int, dict] | None = None  # answer every request with this
    # Upstream settings.
    reject_all: bool = False
    reject_reply: str = REJECTED
    reject_delays: list[float] = attr.Factory(list)  # seconds before the next refusals
    # What happened.
    requests: list[dict[str, str]] = attr.Factory(list)
    issued: list[Issued] = attr.Factory(list)
    answered: list[tuple[float, int]] = attr.Factory(list)  # (time.time(), HTTP status)
    logins: list[Login] = attr.Factory(list)
    messages: list[tuple[str, list[str], bytes]] = attr.Factory(list)
    tls_sessions: list[float] = attr.Factory(list)  # time.time() of each EHLO under TLS
    revoked: set[str] = attr.Factory(set)
    lock: threading.Lock = attr.Factory(threading.Lock)
    _port: Any = None
    _number: int = 0
    _controller: Any = None
    upstream_port: int = 0

    # The token endpoint.

    @property
    def token_url(self) -> str:
        return f"https://localhost:{self._number}/token"

    @property
    def endpoint_host(self) -> str:
        return f"localhost:{self._number}"

    @property
    def endpoint_ca(self) -> str:
        return self.certificate[0]

    def start_endpoint(self) -> None:
        """Listen (again: on the same port) for token requests."""
        options = ServerTLS(server_context(*self.certificate))
        site = Site(TokenResource(self, self.reactor))
        site.noisy = False
        self._port = blockingCallFromThread(self.reactor, self.reactor.listenSSL,
                                            self._number, site, options,
                                            interface="127.0.0.1")
        self._number = self._port.getHost().port

    def stop_endpoint(self) -> None:
        if self._port is not None:
            port, self._port = self._port, None
            blockingCallFromThread(self.reactor, port.stopListening)

    def answer(self, path: bytes, form: dict[str, str]) -> tuple[int, dict]:
        """The endpoint's status and JSON body for one request."""
        with self.lock:
            code, body = self._decide(path, form)
            self.answered.append((time.time(), code))
        return code, body

    def _decide(self, path: bytes, form: dict[str, str]) -> tuple[int, dict]:
        if self.failure is not None:
            return self.failure
        if path != b"/token":
            return 404, {"error": "not_found"}
        refused = self._client_refused(form)
        if refused is not None:
            return refused
        grant = form.get("grant_type")
        body: dict[str, Any] = {}
        if grant == "refresh_token":
            refresh, now = form.get("refresh_token", ""), time.time()
            limit, used = self.refresh_idle_limit, self.refresh_used.get(refresh)
            if refresh not in self.refresh_tokens or \
                    limit is not None and used is not None and now - used > limit:
                return 400, dict(INVALID_GRANT)
            self.refresh_used[refresh] = now
            if self.rotate:
                self.refresh_tokens = {secret("refresh")}
                body["refresh_token"] = next(iter(self.refresh_tokens))
                self.refresh_used[body["refresh_token"]] = now
        elif grant != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        now = time.time()
        issued = Issued(secret("access"), now, now + self.expires_in)
        self.issued.append(issued)
        return 200, {"access_token": issued.token, "token_type": "Bearer",
                     "expires_in": self.expires_in, "scope": form.get("scope", GOOGLE_SCOPE),
                     **body}

    def _client_refused(self, form: dict[str, str]) -> tuple[int, dict] | None:
        """The answer to a request whose client does not authenticate as it must."""
        if form.get("client_id") != self.client_id:
            return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
        if self.assertion_certificate is None:
            if form.get("client_secret") != self.client_secret:
                return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
            return None
        if "client_assertion" not in form and "client_secret" not in form:
            return 401, dict(NO_CREDENTIAL)
        problem = verify_assertion(self.assertion_certificate, form, self.token_url)
        if problem is not None or "client_secret" in form:
            return 401, {"error": "invalid_client", "error_description": problem or "both"}
        return None

    def valid(self, token: str) -> bool:
        """Whether the upstream takes C{token} now."""
        with self.lock:
            if self.reject_all or token in self.revoked:
                return False
            issued = next((i for i in self.issued if i.token == token), None)
            return issued is not None and time.time() < issued.expires_at

    def revoke(self) -> None:
        """Every token issued so far is refused from now on."""
        with self.lock:
            self.revoked.update(i.token for i in self.issued)

    # Snapshots for the test thread.

    def request_list(self) -> list[dict[str, str]]:
        with self.lock:
            return list(self.requests)

    def issued_tokens(self) -> list[str]:
        with self.lock:
            return [i.token for i in self.issued]

    def login_list(self) -> list[Login]:
        with self.lock:
            return list(self.logins)

    def message_list(self) -> list[tuple[str, list[str], bytes]]:
        with self.lock:
            return list(self.messages)

    # The upstream.

    def start_upstream(self, directory: str) -> None:
        cert, key = write_certificate(directory, ["localhost", "127.0.0.1"])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.ca_file = write_ca_bundle(os.path.join(directory, "ca.pem"))
        self._controller = _Controller(
            _Handler(self), hostname="127.0.0.1", port=0, server_hostname="smtp.test",
            tls_context=context, require_starttls=True, auth_required=True,
            auth_require_tls=True, auth_exclude_mechanism=["PLAIN", "LOGIN"],
            decode_data=False)
        self._controller.start()
        self.upstream_port = self._controller.port

    def stop(self) -> None:
        self.stop_endpoint()
        if self._controller is not None and self._controller._thread is not None:
            self._controller.stop()


def start_provider(reactor: Any, certificate: tuple[str, str], directory: str, *,
                   username: str = USERNAME, client_id: str = CLIENT_ID,
                   with_secret: bool = True) -> Provider:
    """Start the token endpoint and the upstream; C{Provider.stop()} ends both.  The
    endpoint expects C{client_id}, a client secret (unless not C{with_secret}) and one
    refresh token: C{Provider.client_secret}, C{next(iter(Provider.refresh_tokens))}."""
    os.makedirs(directory, exist_ok=True)
    provider = Provider(reactor, certificate, username, client_id,
                        secret("client-secret") if with_secret else None,
                        {secret("refresh")})
    provider.start_upstream(directory)
    try:
        provider.start_endpoint()
    except BaseException:
        provider.stop()
        raise
    return provider


# A forward proxy.

@attr.define
class ForwardProxy:
    """tinyproxy listening on 127.0.0.1:C{port}, optionally asking for Basic credentials;
    its log records each tunnel it was asked for."""

    process: subprocess.Popen
    port: int
    log_path: str
    credentials: tuple[str, str] | None = attr.field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The proxy's URL, with its credentials if it wants some."""
        user = f"{self.credentials[0]}:{self.credentials[1]}@" if self.credentials else ""
        return f"http://{user}127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tunnels(self) -> list[str]:
        """The HOST:PORT of every CONNECT request the proxy received, in order."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/", f.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def start_proxy(directory: str, credentials: tuple[str, str] | None = None) -> ForwardProxy:
    """Start tinyproxy on a free loopback port, with its own configuration and log in
    C{directory}; ready when it returns.  C{ForwardProxy.stop()} ends it."""
    os.makedirs(directory, exist_ok=True)
    for _attempt in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log_path = os.path.join(directory, f"tinyproxy-{port}.log")
        config = os.path.join(directory, f"tinyproxy-{port}.conf")
        with open(config, "w", encoding="utf-8") as f:
            f.write(f'Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile "{log_path}"\n'
                    "LogLevel Connect\nMaxClients 50\nAllow 127.0.0.1\n")
            if credentials:
                f.write(f"BasicAuth {credentials[0]} {credentials[1]}\n")
        process = subprocess.Popen(["tinyproxy", "-d", "-c", config],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proxy = ForwardProxy(process, port, log_path, credentials)
        if _listening(proxy):
            return proxy
        proxy.stop()
    raise RuntimeError("tinyproxy did not start")


def _listening(proxy: ForwardProxy) -> bool:
    """Whether the proxy accepts connections within ten seconds (False if it exited)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proxy.process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False
