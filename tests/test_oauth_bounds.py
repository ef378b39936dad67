"""The bounds on a token endpoint's answer, against a real HTTPS endpoint on loopback: an
answer that never ends is given up at the request's timeout, one that is too large at the
size limit, and either way the connection is closed at once, so nothing keeps reading."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.threads import blockingCallFromThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from smtpbridge.errors import TokenError
from smtpbridge.oauth import token_source
from smtpbridge.oauthconfig import OAuthSettings
from smtpbridge.oauthwire import ANSWER_LIMIT
from smtpbridge.secret import Secret
from smtpbridge.tls import ServerTLS, server_context
from tests.oauth_upstream import start_proxy
from tests.test_oauth import CLIENT_ID, SCOPE, checked, secret

TIMEOUT = 1.0  # the request timeout of these tests, in seconds
LARGE = 2 * 1024 * 1024  # bytes of a too large answer
PIECE = 16384  # bytes the endpoint sends at each tick of a large answer


class Endpoint(Resource):
    """A token endpoint that answers in one of these ways: "stall" (no headers, ever),
    "drip" (headers, then a byte of a JSON body every 50 ms, forever), "declared" (a
    2 MiB JSON token answer with its Content-Length) or "streamed" (the same, chunked);
    both large answers are sent a piece every 10 ms.  It records how many body bytes it
    sent and whether the client closed the connection before the answer was complete."""

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self._reactor = reactor
        self.behaviour = "drip"
        self.sent = 0
        self.closed = threading.Event()

    def render_POST(self, request: Any) -> Any:  # noqa: N802 - twisted.web's name
        request.notifyFinish().addErrback(lambda _: self.closed.set())
        if self.behaviour == "stall":
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        if self.behaviour == "drip":
            self._drip(request, b"{")
            return NOT_DONE_YET
        body = json.dumps({"access_token": secret("access"), "token_type": "Bearer",
                           "expires_in": 3599, "padding": ""}).encode()
        body = body[:-2] + b"x" * (LARGE - len(body)) + body[-2:]
        assert len(body) == LARGE
        if self.behaviour == "declared":
            request.setHeader(b"content-length", str(LARGE).encode())
        self._send(request, body)
        return NOT_DONE_YET

    def _drip(self, request: Any, data: bytes) -> None:
        if not self.closed.is_set():
            request.write(data)
            self.sent += len(data)
            self._reactor.callLater(0.05, self._drip, request, b" ")

    def _send(self, request: Any, rest: bytes) -> None:
        if self.closed.is_set():
            return
        request.write(rest[:PIECE])
        self.sent += len(rest[:PIECE])
        if rest[PIECE:]:
            self._reactor.callLater(0.01, self._send, request, rest[PIECE:])
        else:
            request.finish()


@pytest.fixture
def endpoint(reactor: Any, certificate: tuple[str, str]) -> Iterator[tuple[Endpoint, str]]:
    """The endpoint and its URL."""
    cert, key = certificate
    resource = Endpoint(reactor)
    port = blockingCallFromThread(reactor, reactor.listenSSL, 0, Site(resource),
                                  ServerTLS(server_context(cert, key)), interface="127.0.0.1")
    yield resource, f"https://127.0.0.1:{port.getHost().port}/oauth2/token"
    blockingCallFromThread(reactor, port.stopListening)


def attempt(reactor: Any, url: str, ca: str, proxy: str | None = None) -> tuple[str, float]:
    """Ask C{url} for a token, which must fail: the reply's text and the seconds taken."""
    settings = OAuthSettings("client_credentials", url, CLIENT_ID, Secret(secret("cs")),
                             scope=SCOPE, ca_certificates=ca, timeout=TIMEOUT, proxy=proxy)
    source = token_source(settings, reactor)
    started = time.monotonic()
    with pytest.raises(TokenError) as caught:
        blockingCallFromThread(reactor, lambda: source.token().addTimeout(15, reactor))
    return checked(caught.value).reply.text, time.monotonic() - started


@pytest.fixture
def proxy_url(tmp_path: Any) -> Iterator[str]:
    """A real forward proxy (tinyproxy) on loopback."""
    if shutil.which("tinyproxy") is None:
        pytest.skip("tinyproxy is not installed")
    proxy = start_proxy(str(tmp_path / "proxy"))
    yield f"http://127.0.0.1:{proxy.port}"
    proxy.stop()


@pytest.mark.parametrize("through", ["direct", "proxy"])
def test_an_answer_that_never_ends_times_out_and_its_connection_is_closed(
        reactor, endpoint, certificate, tmp_path, request, through):
    resource, url = endpoint
    proxy = request.getfixturevalue("proxy_url") if through == "proxy" else None
    text, took = attempt(reactor, url, certificate[0], proxy)
    host = url.split("/")[2]
    assert text == f"OAuth2 token request to {host} failed: timed out"
    assert TIMEOUT - 0.1 <= took < TIMEOUT + 2
    assert resource.sent > 0  # the headers and some of the body came
    assert resource.closed.wait(2), "the connection stayed open after the timeout"


def test_a_stalled_answer_times_out_and_its_connection_is_closed(reactor, endpoint,
                                                                 certificate):
    resource, url = endpoint
    resource.behaviour = "stall"
    text, took = attempt(reactor, url, certificate[0])
    assert text.endswith("failed: timed out")
    assert TIMEOUT - 0.1 <= took < TIMEOUT + 2
    assert resource.closed.wait(2), "the connection stayed open after the timeout"


@pytest.mark.parametrize("behaviour", ["declared", "streamed"])
def test_a_too_large_answer_fails_and_its_connection_is_closed(reactor, endpoint,
                                                               certificate, behaviour):
    resource, url = endpoint
    resource.behaviour = behaviour
    text, took = attempt(reactor, url, certificate[0])
    host = url.split("/")[2]
    assert text == (f"OAuth2 token request to {host} failed: answer too large "
                    f"(over {ANSWER_LIMIT} bytes)")
    assert took < TIMEOUT
    assert resource.closed.wait(2), "the connection stayed open after the limit"
    assert resource.sent < LARGE // 2  # the rest was never sent, let alone read
