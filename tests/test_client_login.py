"""Logging in upstream: what an upstream echoes back never shows a secret, and only a
5xx to AUTH is a verdict on the credentials."""

from __future__ import annotations

import functools
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from smtpbridge.client import UpstreamProtocol
from smtpbridge.config import Secret
from smtpbridge.connector import set_up, try_login
from smtpbridge.errors import LoginRejected, UpstreamError
from smtpbridge.model import Route, UpstreamAccount
from tests.test_client import ACCOUNT, ROUTE, TLS_OPTIONS, FakeTransport, Harness, logged

FIXTURES = (logged,)


class _Tokens:
    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.invalidated: list[str] = []

    def token(self) -> Deferred[str]:
        return succeed(self.tokens.pop(0))

    def invalidate(self, token: str) -> None:
        self.invalidated.append(token)

    def expires_at(self, token: str) -> None:
        return None


class _OAuthHarness(Harness):
    def __init__(self, tokens: _Tokens) -> None:  # (Harness's own, with a token source)
        self.clock = Clock()
        self.transport = FakeTransport()
        self.protocol = UpstreamProtocol(ROUTE, self.clock)
        self.protocol.makeConnection(self.transport)
        self.result: list[Any] = []
        account = UpstreamAccount("relay@example.com", None, name="o", mechanism="xoauth2",
                                  oauth=True)
        self.setup = set_up(self.protocol, account, "bridge.test", TLS_OPTIONS, tokens=tokens)
        self.setup.addBoth(self.result.append)


def test_a_token_the_upstream_echoes_is_not_logged(logged: list[str]) -> None:
    first, second = "ya29.FIRST-secret-token", "ya29.SECOND-secret-token"
    h = _OAuthHarness(_Tokens(first, second))
    h.to_auth(b"250-x\r\n250 AUTH XOAUTH2\r\n")
    assert h.sent().startswith(b"AUTH XOAUTH2 ")
    h.server(f"535 5.7.8 invalid credentials for token {first}\r\n".encode())
    assert h.sent().startswith(b"AUTH XOAUTH2 ")  # a fresh token, once
    h.server(f"535 5.7.8 invalid credentials for token {second}\r\n".encode())
    assert h.error().code == 454
    assert any("OAuth2 token for relay@example.com refused" in line for line in logged)
    assert not [line for line in logged if first in line or second in line]


def test_a_malformed_reply_echoing_the_login_shows_none_of_it(logged: list[str]) -> None:
    password = "correct-horse-battery-staple-42"
    h = Harness(UpstreamAccount("relay@example.com", Secret(password)))
    h.to_auth()
    plain = h.sent().removeprefix(b"AUTH PLAIN ").removesuffix(b"\r\n")
    h.server(b"535-5.7.8 bad\r\n500 unrecognised: AUTH PLAIN " + plain + b"\r\n")
    error = h.error()
    assert error.code == 451 and "malformed reply" in error.text
    for text in [error.text, *logged]:
        for start in range(0, len(plain) - 7, 4):  # no run of the login shows
            assert plain[start:start + 8].decode() not in text
        assert password[:8] not in text


def test_a_4xx_to_auth_is_no_verdict_on_the_credentials() -> None:
    for reply in (b"454 4.7.0 Temporary authentication failure\r\n",
                  b"421 4.3.2 shutting down\r\n"):
        h = Harness()
        h.to_auth()
        h.sent()
        h.server(reply)
        [failure] = h.result
        assert isinstance(failure, Failure)
        assert failure.check(UpstreamError) and not failure.check(LoginRejected)
        assert failure.value.reply.text.startswith(
            "Upstream smtp.example.com:587 could not log in relay@example.com now: "
            + reply.decode().strip())


def test_a_5xx_to_auth_is_a_verdict() -> None:
    h = Harness()
    h.to_auth()
    h.sent()
    h.server(b"535 5.7.8 Authentication credentials invalid\r\n")
    [failure] = h.result
    assert failure.check(LoginRejected)


def test_a_login_check_tries_the_next_host_after_a_4xx() -> None:
    """A passthrough login check: a host that cannot check now is no wrong password."""
    harnesses: list[Harness] = []

    class Connector:
        def connect(self, route: Route, account: UpstreamAccount | None) -> Deferred[Any]:
            h = Harness(account, route)
            harnesses.append(h)
            settled: Deferred[Any] = Deferred()

            def settle(_: object) -> None:
                [result] = h.result
                if isinstance(result, Failure):
                    settled.errback(result)
                else:
                    settled.callback(result)

            h.setup.addBoth(settle)
            return settled

    routes = (ROUTE, Route("backup.example.com", 587, timeout=30.0))
    checked: list[Any] = []
    try_login(Connector())(routes, ACCOUNT).addBoth(checked.append)
    harnesses[0].to_auth()
    harnesses[0].sent()
    harnesses[0].server(b"454 4.7.0 Temporary authentication failure\r\n")
    assert len(harnesses) == 2 and checked == []  # the backup is asked
    harnesses[1].to_auth()
    harnesses[1].sent()
    harnesses[1].server(b"235 2.7.0 ok\r\n")
    assert harnesses[1].sent() == b"QUIT\r\n"
    harnesses[1].server(b"221 2.0.0 bye\r\n")
    assert checked == [True]


def test_a_close_the_upstream_never_ends_is_cut_after_the_routes_timeout() -> None:
    """Under TLS a close waits for the upstream's close_notify; a hung upstream never
    sends it, and the connection (and its host's slot) must not stay for good."""
    for refused in (False, True):
        lost: list[bool] = []
        h = Harness()
        h.protocol._on_lost = functools.partial(lost.append, True)
        h.to_auth()
        h.sent()
        if refused:  # the login refused: QUIT and close
            h.server(b"535 5.7.8 no\r\n")
        else:  # a session closed after its work: QUIT, 221, close
            h.server(b"235 2.7.0 ok\r\n")
            [session] = h.result
            session.quit()
            assert h.sent() == b"QUIT\r\n"
            h.server(b"221 2.0.0 bye\r\n")
        assert h.transport.disconnecting and not h.transport.disconnected
        h.clock.advance(ROUTE.timeout - 1)
        assert not h.transport.disconnected
        h.clock.advance(1)
        assert h.transport.disconnected  # aborted
        h.protocol.connectionLost(Failure(Exception("aborted")))
        assert lost == [True] and h.clock.getDelayedCalls() == []
