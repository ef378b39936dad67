"""The admin listener over real HTTP: Prometheus text that prometheus_client reads back,
/healthz, /readyz following the upstream down and up again, the bearer token."""

from __future__ import annotations

import smtplib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from smtpbridge.errors import TokenError
from smtpbridge.metrics import Metrics
from smtpbridge.oauth import CachedTokenSource, Token
from tests.conftest import PASSWORD, RunningBridge, client_context, start_bridge, stop_bridge
from tests.test_relay import RECIPIENT, SENDER, relay_toml, smtps, wait_for
from tests.upstream import Upstream, start_upstream, upstream

FIXTURES = (relay_toml, upstream)
TOKEN = "admin-token-Xq7-secret"


@pytest.fixture
def admin_bridge(reactor: Any, relay_toml: Callable[..., str], upstream: Upstream,
                 tmp_path: Any) -> Iterator[RunningBridge]:
    """A bridge relaying to the upstream, with an admin listener that wants a token and
    probes the upstream every second."""
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    toml = relay_toml(upstream) + f"""
[admin]
endpoint = "tcp:0:interface=127.0.0.1"
token_file = "{tmp_path}/admin-token"
probe_interval = 1
"""
    bridge = start_bridge(reactor, toml, str(tmp_path))
    yield bridge
    stop_bridge(reactor, bridge)


def get(bridge: RunningBridge, path: str, token: str | None = TOKEN) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{bridge.ports['admin']}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - http on loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text, read back by prometheus_client's parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_healthz_is_open_and_the_rest_wants_the_token(admin_bridge: RunningBridge) -> None:
    assert get(admin_bridge, "/healthz", token=None) == (200, "ok\n")
    for path in ("/metrics", "/readyz"):
        assert get(admin_bridge, path, token=None)[0] == 401
        assert get(admin_bridge, path, token="wrong")[0] == 401
    assert get(admin_bridge, "/metrics")[0] == 200


def test_metrics_after_real_traffic(admin_bridge: RunningBridge, upstream: Upstream,
                                    certificate: tuple[str, str]) -> None:
    with smtps(admin_bridge, certificate) as client:
        client.sendmail(SENDER, [RECIPIENT], b"Subject: counted\r\n\r\nhi\r\n")
        status, text = get(admin_bridge, "/metrics")
        assert status == 200
        assert samples(text)[("smtpbridge_sessions_open", (("listener", "smtps"),))] == 1
    with pytest.raises(smtplib.SMTPAuthenticationError):
        with smtplib.SMTP_SSL("127.0.0.1", admin_bridge.ports["smtps"],
                              context=client_context(certificate), timeout=30) as client:
            client.login("device", "not-the-password")
    # (A closing TLS session may take up to CLOSE_GRACE, 10 s, to be gone.)
    wait_for(lambda: samples(get(admin_bridge, "/metrics")[1]).get(
        ("smtpbridge_sessions_open", (("listener", "smtps"),))) == 0, seconds=25)
    text = get(admin_bridge, "/metrics")[1]
    found = samples(text)
    sent = (("account", "default"), ("listener", "smtps"), ("status", "sent"))
    assert found[("smtpbridge_messages_total", sent)] == 1
    assert found[("smtpbridge_message_bytes_total", sent)] == len(
        b"Subject: counted\r\n\r\nhi\r\n")
    assert found[("smtpbridge_upstream_replies_total",
                  (("code", "250"), ("route", "default")))] == 1
    assert found[("smtpbridge_upstream_seconds_count", (("route", "default"),))] == 1
    assert found[("smtpbridge_auth_attempts_total",
                  (("listener", "smtps"), ("result", "ok")))] == 1
    # smtplib tries PLAIN, then LOGIN.
    assert found[("smtpbridge_auth_attempts_total",
                  (("listener", "smtps"), ("result", "failed")))] == 2
    assert found[("smtpbridge_auth_blocked_addresses", ())] == 0
    assert found[("smtpbridge_pool_sessions_opened", ())] == 1
    assert found[("smtpbridge_pool_sessions_reused", ())] == 0
    assert found[("smtpbridge_pool_idle_sessions", ())] == 1  # kept for the next message
    tls = [labels for (name, labels), value in found.items()
           if name == "smtpbridge_tls_handshakes_total" and value == 2]
    assert [dict(labels)["version"] for labels in tls] == ["TLSv1.3"]
    assert dict(tls[0])["listener"] == "smtps"
    for secret in (TOKEN, PASSWORD, upstream.password, "not-the-password"):
        assert secret not in text


def test_readyz_follows_the_upstream(admin_bridge: RunningBridge, upstream: Upstream,
                                     tmp_path: Any) -> None:
    wait_for(lambda: get(admin_bridge, "/readyz")[0] == 200, seconds=20)
    assert get(admin_bridge, "/readyz")[1] == "ready\nroute default account default: ok\n"
    port = upstream.port
    upstream.stop()
    wait_for(lambda: get(admin_bridge, "/readyz")[0] == 503, seconds=20)
    status, text = get(admin_bridge, "/readyz")
    assert text.startswith("not ready\nroute default account default: ")
    assert f"localhost:{port}" in text and "unreachable" in text
    found = samples(get(admin_bridge, "/metrics")[1])
    assert found[("smtpbridge_upstream_ready", (("account", "default"),
                                                ("route", "default")))] == 0
    again = start_upstream(str(tmp_path / "again"), port=port)
    try:
        wait_for(lambda: get(admin_bridge, "/readyz")[0] == 200, seconds=20)
        found = samples(get(admin_bridge, "/metrics")[1])
        assert found[("smtpbridge_upstream_ready", (("account", "default"),
                                                    ("route", "default")))] == 1
    finally:
        again.stop()


# The hooks: token fetches, and gauges for the pool and the spool.

def test_token_fetches_are_counted() -> None:
    metrics = Metrics()
    results = [succeed(Token("tok-1", 3600.0)), fail(TokenError("invalid_grant"))]
    source = CachedTokenSource(lambda: results.pop(), Clock())
    source.observe = lambda ok: metrics.token("scanner", ok)
    source.token().addErrback(lambda failure: None)
    source.token()
    found = samples(generate_latest(metrics.registry).decode())
    for result in ("ok", "failed"):
        key = ("smtpbridge_oauth_token_fetches_total", (("account", "scanner"),
                                                         ("result", result)))
        assert found[key] == 1
    assert "tok-1" not in generate_latest(metrics.registry).decode()


def test_a_pool_or_spool_registers_its_figures() -> None:
    metrics = Metrics()
    queued = {("default",): 3.0}
    metrics.gauge("smtpbridge_spool_messages", "Messages in the spool by route", ["route"],
                  lambda: queued)
    metrics.refresh()
    found = samples(generate_latest(metrics.registry).decode())
    assert found[("smtpbridge_spool_messages", (("route", "default"),))] == 3
    queued = {("gmail",): 1.0}
    metrics.refresh()
    found = samples(generate_latest(metrics.registry).decode())
    assert ("smtpbridge_spool_messages", (("route", "default"),)) not in found
    assert found[("smtpbridge_spool_messages", (("route", "gmail"),))] == 1


def test_no_admin_table_no_listener(bridge: RunningBridge) -> None:
    assert "admin" not in bridge.ports


# The admin listener's bounds: no request body kept, a limited number of connections.
# (Imports are local: this part was added after the rest of the file.)

def raw_admin(bridge: RunningBridge, timeout: float = 5.0) -> Any:
    """A plain socket to the admin listener."""
    import socket

    return socket.create_connection(("127.0.0.1", bridge.ports["admin"]), timeout=timeout)


def read_to_end(sock: Any) -> bytes:
    """What the listener sends until it closes the connection (a reset ends it too); a
    listener that keeps it open past the socket's timeout fails the test."""
    received = b""
    try:
        while data := sock.recv(4096):
            received += data
            assert len(received) < 65536, "far more than an error page"
    except ConnectionResetError:
        pass
    return received


@pytest.fixture
def temporary_files(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every temporary file the process opens during the test (twisted.web keeps a large
    request body in one)."""
    import tempfile

    opened: list[object] = []
    real = tempfile.TemporaryFile

    def spy(*args: Any, **kwargs: Any) -> Any:
        opened.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", spy)
    return opened


def test_a_huge_declared_body_is_refused_before_it_is_sent(
        admin_bridge: RunningBridge, temporary_files: list[object]) -> None:
    import time

    for expect in (b"", b"Expect: 100-continue\r\n"):
        started = time.monotonic()
        with raw_admin(admin_bridge) as sock:
            sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: admin\r\n" + expect
                         + b"Content-Length: 10000000000\r\n\r\n")
            answer = read_to_end(sock)  # no byte of the body sent: the answer comes anyway
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert answer.endswith(b"\r\n\r\nthe admin pages take no request body\n")
        assert time.monotonic() - started < 3
    assert temporary_files == []


def test_an_endless_chunked_body_is_cut_off(admin_bridge: RunningBridge,
                                            temporary_files: list[object]) -> None:
    chunk = b"1000\r\n" + b"x" * 0x1000 + b"\r\n"
    sent, cut = 0, False
    with raw_admin(admin_bridge) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: admin\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 256 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except (ConnectionResetError, BrokenPipeError):
            cut = True
        answer = read_to_end(sock)
    # Until the reset comes back, only what the sockets' buffers hold is sent (tens of
    # KiB here; the kernel's largest buffers are 32 MiB to receive and 4 MiB to send).
    assert cut and sent < 64 * 1024 * 1024, sent
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413 "), answer  # b"": reset first
    assert temporary_files == []


def test_a_body_up_to_the_limit_is_still_served(admin_bridge: RunningBridge) -> None:
    from smtpbridge.admin import MAX_BODY

    def ask(path: str, body: bytes, token: str | None = None, chunked: bool = False) -> bytes:
        head = f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n".encode()
        if token is not None:
            head += f"Authorization: Bearer {token}\r\n".encode()
        if chunked:
            head += b"Transfer-Encoding: chunked\r\n\r\n"
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        else:
            head += b"Content-Length: %d\r\n\r\n" % len(body)
        with raw_admin(admin_bridge) as sock:
            sock.sendall(head + body)
            answer = read_to_end(sock)
        assert answer.count(b"HTTP/1.1 ") == 1, answer  # one answer, never a second
        return answer.partition(b"\r\n")[0]

    for chunked in (False, True):
        assert ask("/healthz", b"x" * MAX_BODY, chunked=chunked) == b"HTTP/1.1 200 OK"
        assert ask("/metrics", b"x" * MAX_BODY, chunked=chunked).startswith(b"HTTP/1.1 401 ")
        assert ask("/metrics", b"x", TOKEN, chunked=chunked) == b"HTTP/1.1 200 OK"
        for path in ("/healthz", "/metrics"):
            assert ask(path, b"x" * (MAX_BODY + 1), TOKEN, chunked).startswith(
                b"HTTP/1.1 413 ")
    assert get(admin_bridge, "/healthz", token=None) == (200, "ok\n")
    assert get(admin_bridge, "/metrics", token=None)[0] == 401
    assert get(admin_bridge, "/metrics")[0] == 200


def test_connections_beyond_the_limit_are_closed(admin_bridge: RunningBridge) -> None:
    from smtpbridge.admin import MAX_CONNECTIONS

    def healthz() -> bool:
        try:
            return get(admin_bridge, "/healthz", token=None) == (200, "ok\n")
        except OSError:  # closed at once: the limit is reached
            return False

    held = [raw_admin(admin_bridge) for _ in range(MAX_CONNECTIONS)]
    try:
        for _ in range(3):
            with raw_admin(admin_bridge) as extra:
                assert read_to_end(extra) == b""  # closed before a word
        assert not healthz()
        # The connections within the limit are served.
        held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        with held.pop() as served:
            assert read_to_end(served).startswith(b"HTTP/1.1 200 OK\r\n")
        wait_for(healthz, seconds=5)  # one place free again
    finally:
        for sock in held:
            sock.close()
    wait_for(healthz, seconds=5)


def test_a_connection_that_trickles_its_request_is_closed_in_time(
        admin_bridge: RunningBridge, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twisted's idle timeout starts again at every byte: a request sent a byte at a time
    would hold one of the few places for good."""
    import time

    from smtpbridge import admin

    monkeypatch.setattr(admin, "MAX_CONNECTION_TIME", 1.0)
    with raw_admin(admin_bridge) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n")
        closed = False
        while time.monotonic() - started < 5:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed and time.monotonic() - started < 4
    assert get(admin_bridge, "/healthz", token=None) == (200, "ok\n")
