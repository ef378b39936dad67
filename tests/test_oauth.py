"""OAuth2 tokens: the grants against a local HTTPS token endpoint, the cache with a Clock."""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attr
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from smtpbridge.errors import TokenError
from smtpbridge.interfaces import ITokenSource
from smtpbridge.oauth import ASSERTION_TYPE, CachedTokenSource, Token, token_source
from smtpbridge.oauthconfig import OAuthSettings
from smtpbridge.secret import Secret
from smtpbridge.tls import ServerTLS, create_self_signed, server_context

CLIENT_ID = "3f0c9d1e-bridge-app"
SCOPE = "https://outlook.office365.com/.default"
LEAKABLE: set[str] = set()  # every secret used or issued here: none may reach a log or error
EVENTS: list[dict] = []
ERRORS: list[str] = []


def secret(kind: str) -> str:
    value = f"{kind}-{secrets.token_urlsafe(24)}"
    LEAKABLE.add(value)
    return value


@pytest.fixture(autouse=True, scope="module")
def captured_logs() -> Iterator[None]:
    observer = EVENTS.append
    globalLogPublisher.addObserver(observer)
    yield
    globalLogPublisher.removeObserver(observer)


class TokenResource(Resource):
    """A token endpoint: records each request's form fields, answers from a queue (or
    with a fresh token) after an optional check of the request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.answers: list[tuple[int, Any]] = []
        self.check: Callable[[dict[str, str]], str | None] | None = None
        self.issued: list[str] = []

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 - twisted.web's name
        assert all(len(values) == 1 for values in request.args.values())
        form = {key.decode(): values[0].decode() for key, values in request.args.items()}
        self.requests.append(form)
        request.setHeader(b"content-type", b"application/json")
        problem = self.check(form) if self.check else None
        code, body = (401, {"error": "invalid_client", "error_description": problem}) \
            if problem else self.answers.pop(0) if self.answers else (200, {})
        if code == 200 and isinstance(body, dict):
            self.issued.append(secret("access"))
            body = {"access_token": self.issued[-1], "token_type": "Bearer",
                    "expires_in": 3599, **body}
        request.setResponseCode(code)
        return body if isinstance(body, bytes) else json.dumps(body).encode()


@attr.define
class Endpoint:
    resource: TokenResource
    port: Any
    ca: str

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}/tenant-1/oauth2/v2.0/token"

    @property
    def requests(self) -> list[dict[str, str]]:
        return self.resource.requests


@pytest.fixture(scope="module")
def endpoint_server(reactor: Any, certificate: tuple[str, str]) -> Iterator[Endpoint]:
    cert, key = certificate
    options = ServerTLS(server_context(cert, key))
    resource = TokenResource()
    port = blockingCallFromThread(reactor, reactor.listenSSL, 0, Site(resource), options,
                                  interface="127.0.0.1")
    yield Endpoint(resource, port, cert)
    blockingCallFromThread(reactor, port.stopListening)


@pytest.fixture
def endpoint(endpoint_server: Endpoint) -> Endpoint:
    endpoint_server.resource.reset()
    return endpoint_server


def settings_for(endpoint: Endpoint, **changes: Any) -> OAuthSettings:
    values = {"grant": "client_credentials", "token_url": endpoint.url, "client_id": CLIENT_ID,
              "scope": SCOPE, "ca_certificates": endpoint.ca, "timeout": 10.0}
    return OAuthSettings(**{**values, **changes})


def waited(reactor: Any, start: Callable[[], Deferred]) -> Any:
    """The result of the Deferred C{start} returns in the reactor thread (15 s at most)."""
    return blockingCallFromThread(reactor, lambda: start().addTimeout(15, reactor))


def obtain(reactor: Any, source: Any) -> str:
    return waited(reactor, source.token)


def checked(error: TokenError) -> TokenError:
    assert (error.reply.code, error.reply.enhanced) == (454, "4.7.0")
    ERRORS.extend((str(error), error.reply.text))
    return error


def refused(reactor: Any, source: Any) -> TokenError:
    with pytest.raises(TokenError) as caught:
        waited(reactor, source.token)
    return checked(caught.value)


def result_of(d: Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def refresh_token_file(tmp_path: Any, value: str, mode: int = 0o600) -> str:
    path = tmp_path / "secrets" / "refresh-token"
    path.parent.mkdir()
    path.write_text(f"\n {value} \n")
    path.chmod(mode)
    return str(path)


# --- the grants, over HTTPS -------------------------------------------------------------

def test_refresh_grant_posts_the_fields(reactor, endpoint, tmp_path):
    refresh, client_secret = secret("refresh"), secret("client-secret")
    path = refresh_token_file(tmp_path, refresh)
    source = token_source(settings_for(endpoint, grant="refresh_token", scope=None,
                                       client_secret=Secret(client_secret),
                                       refresh_token_file=path), reactor)
    assert obtain(reactor, source) == endpoint.resource.issued[0]
    assert endpoint.requests == [{"grant_type": "refresh_token", "refresh_token": refresh,
                                  "client_id": CLIENT_ID, "client_secret": client_secret}]
    public = token_source(settings_for(endpoint, grant="refresh_token",
                                       scope="https://mail.google.com/",
                                       refresh_token_file=path), reactor)
    obtain(reactor, public)
    assert endpoint.requests[1] == {"grant_type": "refresh_token", "refresh_token": refresh,
                                    "client_id": CLIENT_ID, "scope": "https://mail.google.com/"}
    with open(path) as f:
        assert f.read() == f"\n {refresh} \n"  # no rotation: the file is left alone


def test_a_rotated_refresh_token_is_saved_atomically(reactor, endpoint, tmp_path):
    old, new = secret("refresh"), secret("refresh")
    path = refresh_token_file(tmp_path, old, mode=0o644)
    source = token_source(settings_for(endpoint, grant="refresh_token",
                                       refresh_token_file=path), reactor)
    endpoint.resource.answers.append((200, {"refresh_token": new}))
    first = obtain(reactor, source)
    with open(path) as f:
        assert f.read() == new + "\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(os.path.dirname(path)) == ["refresh-token"]  # no temporary file left
    source.invalidate(first)
    assert obtain(reactor, source) != first
    assert [r["refresh_token"] for r in endpoint.requests] == [old, new]


def test_client_credentials_with_a_secret(reactor, endpoint):
    client_secret = secret("client-secret")
    source = token_source(settings_for(endpoint, client_secret=Secret(client_secret)),
                          reactor)
    assert obtain(reactor, source) == endpoint.resource.issued[0]
    assert endpoint.requests == [{"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                  "scope": SCOPE, "client_secret": client_secret}]


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assertion_checker(certificate: str, seen: list[tuple[dict, dict]]) -> Callable:
    """What the endpoint does: verify the JWT's RS256 signature with the certificate's key."""
    with open(certificate, "rb") as f:
        public_key = x509.load_pem_x509_certificate(f.read()).public_key()

    def check(form: dict[str, str]) -> str | None:
        assertion = form.get("client_assertion", "")
        LEAKABLE.add(assertion)
        try:
            header, claims, signature = assertion.split(".")
            public_key.verify(_b64decode(signature), f"{header}.{claims}".encode(),
                              padding.PKCS1v15(), hashes.SHA256())
        except (ValueError, InvalidSignature) as e:
            return f"AADSTS700027: client assertion is invalid ({type(e).__name__})"
        seen.append((json.loads(_b64decode(header)), json.loads(_b64decode(claims))))
        return None

    return check


def test_client_credentials_with_a_certificate_assertion(reactor, endpoint, tmp_path):
    cert, key = str(tmp_path / "client.pem"), str(tmp_path / "client.key")
    create_self_signed(cert, key, "smtpbridge-client")
    seen: list[tuple[dict, dict]] = []
    endpoint.resource.check = assertion_checker(cert, seen)
    source = token_source(settings_for(endpoint, client_certificate=cert, client_key=key),
                          reactor)
    assert obtain(reactor, source) == endpoint.resource.issued[0]
    [form] = endpoint.requests
    assert set(form) == {"grant_type", "client_id", "scope", "client_assertion_type",
                         "client_assertion"}
    assert form["client_assertion_type"] == ASSERTION_TYPE
    [(header, claims)] = seen
    with open(cert, "rb") as f:
        der = x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)
    sha1, sha256 = hashes.Hash(hashes.SHA1()), hashes.Hash(hashes.SHA256())  # noqa: S303
    sha1.update(der)
    sha256.update(der)
    assert header == {"alg": "RS256", "typ": "JWT", "x5t": _b64encode(sha1.finalize()),
                      "x5t#S256": _b64encode(sha256.finalize())}
    assert claims["aud"] == endpoint.url
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert uuid.UUID(claims["jti"])
    assert claims["iat"] == claims["nbf"] and abs(claims["nbf"] - time.time()) < 60
    assert claims["exp"] == claims["nbf"] + 600
    source.invalidate(endpoint.resource.issued[0])
    obtain(reactor, source)
    assert seen[0][1]["jti"] != seen[1][1]["jti"]  # a new assertion for each request


def test_a_key_of_another_certificate_is_refused_before_asking(reactor, endpoint, tmp_path):
    create_self_signed(str(tmp_path / "a.pem"), str(tmp_path / "a.key"), "a")
    create_self_signed(str(tmp_path / "b.pem"), str(tmp_path / "b.key"), "b")
    source = token_source(settings_for(endpoint, client_certificate=str(tmp_path / "a.pem"),
                                       client_key=str(tmp_path / "b.key")), reactor)
    assert "client_key does not belong to client_certificate" in refused(reactor, source)\
        .reply.text
    assert endpoint.requests == []


def test_concurrent_callers_share_one_request(reactor, endpoint):
    source = token_source(settings_for(endpoint, client_secret=Secret(secret("cs"))), reactor)
    tokens = waited(reactor, lambda: gatherResults([source.token() for _ in range(20)]))
    assert tokens == [endpoint.resource.issued[0]] * 20
    assert len(endpoint.requests) == 1
    assert obtain(reactor, source) == tokens[0]  # reused
    assert len(endpoint.requests) == 1


def test_invalidate_makes_a_new_request(reactor, endpoint):
    source = token_source(settings_for(endpoint, client_secret=Secret(secret("cs"))), reactor)
    first = obtain(reactor, source)
    source.invalidate("some other token")
    assert obtain(reactor, source) == first
    source.invalidate(first)
    second = obtain(reactor, source)
    assert second != first and len(endpoint.requests) == 2


def test_an_unreachable_endpoint(reactor, endpoint):
    port = blockingCallFromThread(reactor, reactor.listenTCP, 0, Site(Resource()),
                                  interface="127.0.0.1")
    number = port.getHost().port
    blockingCallFromThread(reactor, port.stopListening)
    url = f"https://127.0.0.1:{number}/token?tenant=x"
    source = token_source(settings_for(endpoint, token_url=url,
                                       client_secret=Secret(secret("cs"))), reactor)
    text = refused(reactor, source).reply.text
    assert text.startswith(f"OAuth2 token request to 127.0.0.1:{number} failed: unreachable: ")
    assert "refused" in text and "tenant" not in text


def test_an_untrusted_endpoint_certificate(reactor, endpoint):
    source = token_source(settings_for(endpoint, ca_certificates=None,
                                       client_secret=Secret(secret("cs"))), reactor)
    text = refused(reactor, source).reply.text
    assert f"{endpoint.host} failed: unreachable: TLS failed: " in text
    assert "certificate verify failed" in text
    assert endpoint.requests == []


def test_the_endpoints_error_is_reported_and_the_next_call_tries_again(reactor, endpoint):
    source = token_source(settings_for(endpoint, client_secret=Secret(secret("cs"))), reactor)
    description = ("AADSTS70000: The provided grant is invalid or malformed. " * 10
                   + "\r\nTrace ID: 0f4e\r\nTimestamp: 2025-01-01 00:00:00Z")
    endpoint.resource.answers.append(
        (400, {"error": "invalid_grant", "error_description": description}))
    text = refused(reactor, source).reply.text
    prefix = f"OAuth2 token request to {endpoint.host} failed: invalid_grant: AADSTS70000: "
    assert text.startswith(prefix)
    assert "Trace ID" not in text and "\n" not in text
    assert len(text) <= len(prefix) + 200
    assert obtain(reactor, source) == endpoint.resource.issued[0]
    assert len(endpoint.requests) == 2


def test_an_answer_that_is_not_json(reactor, endpoint):
    source = token_source(settings_for(endpoint, client_secret=Secret(secret("cs"))), reactor)
    endpoint.resource.answers.append((502, b"<html><body>Bad gateway</body></html>"))
    assert refused(reactor, source).reply.text == \
        f"OAuth2 token request to {endpoint.host} failed: HTTP 502"


def test_an_echoed_secret_is_hidden(reactor, endpoint):
    client_secret = secret("client-secret")
    source = token_source(settings_for(endpoint, client_secret=Secret(client_secret)),
                          reactor)
    endpoint.resource.answers.append(
        (401, {"error": "invalid_client", "error_description": f"secret {client_secret} "
                                                              "has expired"}))
    text = refused(reactor, source).reply.text
    assert text.endswith("invalid_client: secret <hidden> has expired")


def test_a_missing_refresh_token_file(reactor, endpoint, tmp_path):
    path = str(tmp_path / "nowhere" / "refresh-token")
    source = token_source(settings_for(endpoint, grant="refresh_token",
                                       refresh_token_file=path), reactor)
    text = refused(reactor, source).reply.text
    assert text == (f"OAuth2 token request to {endpoint.host} failed: cannot read refresh "
                    f"token file {path}: No such file or directory")
    assert endpoint.requests == []


class HangingAgent:
    """An agent whose requests never get an answer."""

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred:  # noqa: N803 - IAgent's name
        return Deferred()


def test_a_request_times_out():
    clock = Clock()
    settings = OAuthSettings("client_credentials", "https://login.example/token", CLIENT_ID,
                             Secret(secret("cs")), scope=SCOPE, timeout=30.0)
    source = token_source(settings, clock, agent=HangingAgent())
    d = source.token()
    clock.advance(29.9)
    assert not d.called
    clock.advance(0.1)
    with pytest.raises(TokenError) as caught:
        result_of(d)
    assert checked(caught.value).reply.text == \
        "OAuth2 token request to login.example failed: timed out"


# --- the token file grant and the cache, with a Clock ----------------------------------

def test_token_file_grant(tmp_path):
    clock, path = Clock(), tmp_path / "access-token"
    first, second, third = secret("access"), secret("access"), secret("access")
    path.write_text(first + "\n")
    source = token_source(OAuthSettings("token_file", token_file=str(path)), clock)
    verifyObject(ITokenSource, source)
    assert result_of(source.token()) == first
    path.write_text(second + "\n")
    clock.advance(299.9)
    assert result_of(source.token()) == first
    clock.advance(0.1)
    assert result_of(source.token()) == second
    path.write_text(third)
    source.invalidate(second)
    assert result_of(source.token()) == third
    path.unlink()
    source.invalidate(third)
    with pytest.raises(TokenError) as caught:
        result_of(source.token())
    assert checked(caught.value).reply.text == \
        f"OAuth2 token file {path} unusable: No such file or directory"


@attr.define
class FakeFetch:
    """Counts fetches; answers at once with token-N (or leaves them pending)."""

    clock: Clock
    lifetime: float = 3600.0
    pending: list[Deferred] | None = None
    calls: int = 0

    def __call__(self) -> Deferred:
        self.calls += 1
        token = Token(f"token-{self.calls}", self.clock.seconds() + self.lifetime)
        if self.pending is None:
            return succeed(token)
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def finish(self) -> None:
        d = self.pending.pop(0)
        d.callback(Token(f"token-{self.calls}", self.clock.seconds() + self.lifetime))


def test_the_cache_implements_the_interface():
    clock = Clock()
    verifyObject(ITokenSource, CachedTokenSource(FakeFetch(clock), clock))


def test_a_token_is_reused_until_shortly_before_it_expires():
    clock = Clock()
    fetch = FakeFetch(clock, lifetime=3600.0)
    source = CachedTokenSource(fetch, clock, margin=60.0)
    assert result_of(source.token()) == "token-1"
    clock.advance(3539.9)
    assert result_of(source.token()) == "token-1"
    clock.advance(0.1)  # 60 s before it expires
    assert result_of(source.token()) == "token-2"
    assert result_of(source.token()) == "token-2"
    assert fetch.calls == 2


def test_a_short_lived_token_is_reused_for_nine_tenths_of_its_life():
    clock = Clock()
    fetch = FakeFetch(clock, lifetime=100.0)
    source = CachedTokenSource(fetch, clock, margin=60.0)
    assert result_of(source.token()) == "token-1"
    clock.advance(89.9)
    assert result_of(source.token()) == "token-1"
    clock.advance(0.1)
    assert result_of(source.token()) == "token-2"


def test_one_fetch_serves_every_concurrent_caller():
    clock = Clock()
    fetch = FakeFetch(clock, pending=[])
    source = CachedTokenSource(fetch, clock)
    waiting = [source.token() for _ in range(20)]
    assert fetch.calls == 1 and not any(d.called for d in waiting)
    fetch.finish()
    assert [result_of(d) for d in waiting] == ["token-1"] * 20
    assert result_of(source.token()) == "token-1" and fetch.calls == 1


def test_a_failed_fetch_fails_every_waiter_and_the_next_call_tries_again():
    clock = Clock()
    fetch = FakeFetch(clock, pending=[])
    source = CachedTokenSource(fetch, clock)
    waiting = [source.token() for _ in range(3)]
    fetch.pending.pop().errback(TokenError("OAuth2 token request to x failed: timed out"))
    for d in waiting:
        with pytest.raises(TokenError, match="timed out"):
            result_of(d)
    retry = source.token()
    assert fetch.calls == 2
    fetch.finish()
    assert result_of(retry) == "token-2"


def test_an_unexpected_failure_becomes_a_token_error_without_its_text():
    clock = Clock()
    leaked = secret("bug")
    source = CachedTokenSource(lambda: fail(RuntimeError(leaked)), clock)
    with pytest.raises(TokenError) as caught:
        result_of(source.token())
    assert checked(caught.value).reply.text == \
        "OAuth2 token request failed: internal error (RuntimeError)"


def test_invalidate_drops_only_the_cached_token():
    clock = Clock()
    fetch = FakeFetch(clock)
    source = CachedTokenSource(fetch, clock)
    assert result_of(source.token()) == "token-1"
    source.invalidate("token-0")
    assert result_of(source.token()) == "token-1"
    source.invalidate("token-1")
    assert result_of(source.token()) == "token-2"
    assert fetch.calls == 2


# --- last: nothing secret in any log event or error text --------------------------------

def test_no_secret_in_any_log_event_or_error(reactor, endpoint, tmp_path):
    client_secret, old, new = secret("client-secret"), secret("refresh"), secret("refresh")
    source = token_source(settings_for(endpoint, grant="refresh_token",
                                       client_secret=Secret(client_secret),
                                       refresh_token_file=refresh_token_file(tmp_path, old)),
                          reactor)
    endpoint.resource.answers += [
        (200, {"refresh_token": new}),
        (400, {"error": "invalid_grant", "error_description": f"{new} was revoked"})]
    token = obtain(reactor, source)
    source.invalidate(token)
    refused(reactor, source)
    texts = []
    for event in list(EVENTS):
        texts.append(formatEvent(event))
        texts.extend(repr(value) for value in event.values())
        if "log_failure" in event:
            texts.append(event["log_failure"].getTraceback())
    logged = "\n".join(texts)
    assert f"OAuth2 token for {CLIENT_ID} from {endpoint.host}: expires in 3599 s" in logged
    assert f"OAuth2 token request to {endpoint.host} failed: invalid_grant: <hidden> was " \
           "revoked" in logged
    assert token in LEAKABLE and new in LEAKABLE and len(ERRORS) >= 1
    for value in LEAKABLE:
        assert value not in logged
        for text in ERRORS:
            assert value not in text
