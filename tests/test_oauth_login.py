"""Tests for ``smtpbridge oauth-login``: the real command against fake HTTPS endpoints."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import queue
import secrets
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import attr
import pytest
from twisted.internet.threads import blockingCallFromThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from smtpbridge.tls import ServerTLS, server_context
from tests.oauth_upstream import start_proxy

SMTPBRIDGE = os.path.join(os.path.dirname(sys.executable), "smtpbridge")
CLIENT_ID = "client-1"
USER_CODE = "WDJB-MJHT"
PENDING = (400, {"error": "authorization_pending", "error_description": "not yet"})


def secret(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(8)}"


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class FakeProvider(Resource):
    """Device authorization (/device) and token (/token) endpoints: record each request
    with its time, answer from queues; authorization codes are checked against PKCE."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.requests: list[tuple[str, dict[str, str], float]] = []
        self.device_answers: list[tuple[int, dict[str, Any]]] = []
        self.token_answers: list[tuple[int, dict[str, Any]]] = []
        self.codes: dict[str, tuple[str, str]] = {}  # code -> (challenge, redirect_uri)

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 - twisted.web's name
        form = {key.decode(): values[0].decode() for key, values in request.args.items()}
        path = request.path.decode()
        self.requests.append((path, form, time.monotonic()))
        request.setHeader(b"content-type", b"application/json")
        if path == "/device":
            code, body = self.device_answers.pop(0)
        elif path == "/token":
            code, body = self._pkce_problem(form) or self.token_answers.pop(0)
        else:
            code, body = 404, {"error": "not_found"}
        request.setResponseCode(code)
        return json.dumps(body).encode()

    def _pkce_problem(self, form: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        if form.get("grant_type") != "authorization_code":
            return None
        challenge, redirect_uri = self.codes.get(form.get("code", ""), ("", ""))
        if not challenge or s256(form.get("code_verifier", "")) != challenge:
            return 400, {"error": "invalid_grant", "error_description": "PKCE check failed"}
        if form.get("redirect_uri") != redirect_uri:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri differs"}
        return None

    def tokens(self, **extra: Any) -> dict[str, Any]:
        """A successful token answer (a fresh access token, C{extra} added)."""
        return {"access_token": secret("access"), "token_type": "Bearer",
                "expires_in": 3599, **extra}


@attr.define
class Endpoints:
    resource: FakeProvider
    port: Any
    ca: str

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port.getHost().port}{path}"

    def requests(self, path: str) -> list[dict[str, str]]:
        return [form for where, form, _ in self.resource.requests if where == path]


@pytest.fixture(scope="module")
def endpoints_server(reactor: Any, certificate: tuple[str, str]) -> Iterator[Endpoints]:
    options = ServerTLS(server_context(*certificate))
    resource = FakeProvider()
    port = blockingCallFromThread(reactor, reactor.listenSSL, 0, Site(resource), options,
                                  interface="127.0.0.1")
    yield Endpoints(resource, port, certificate[0])
    blockingCallFromThread(reactor, port.stopListening)


@pytest.fixture
def endpoints(endpoints_server: Endpoints) -> Endpoints:
    endpoints_server.resource.reset()
    return endpoints_server


@pytest.fixture
def token_file(tmp_path: Any) -> str:
    return str(tmp_path / "secrets" / "refresh-token")


@pytest.fixture(autouse=True)
def secrets_directory(tmp_path: Any) -> None:
    (tmp_path / "secrets").mkdir()


def device_command(endpoints: Endpoints, token_file: str, *extra: str) -> list[str]:
    return [SMTPBRIDGE, "oauth-login", "--provider", "microsoft", "--tenant", "tenant-1",
            "--client-id", CLIENT_ID, "--refresh-token-file", token_file,
            "--device-url", endpoints.url("/device"), "--token-url", endpoints.url("/token"),
            "--ca-certificates", endpoints.ca, "--timeout", "60", *extra]


def run(command: list[str], env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    if env is not None:
        env = {**{key: value for key, value in os.environ.items()
                  if key.lower() not in ("https_proxy", "no_proxy")}, **env}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                          env=env)


def device_code_answer(**extra: Any) -> tuple[int, dict[str, Any]]:
    return 200, {"device_code": "device-code-secret", "user_code": USER_CODE,
                 "verification_uri": "https://login.example.test/device",
                 "interval": 1, "expires_in": 900, **extra}


def assert_failed(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The single stderr line of a failed run, checked to hold C{words}."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("smtpbridge: oauth-login: "), lines
    for word in words:
        assert word in lines[0]
    return lines[0]


def assert_secret_free(text: str, *values: str) -> None:
    for value in values:
        assert value not in text


# --- device code flow ------------------------------------------------------------------

def test_device_flow_polls_until_signed_in(endpoints, token_file, tmp_path):
    client_secret = secret("client-secret")
    (tmp_path / "client-secret").write_text(client_secret + "\n")
    refresh = secret("refresh")
    endpoints.resource.device_answers.append(device_code_answer())
    answer = endpoints.resource.tokens(refresh_token=refresh)
    endpoints.resource.token_answers += [PENDING, PENDING, (200, answer)]

    result = run(device_command(endpoints, token_file, "--client-secret-file",
                                str(tmp_path / "client-secret")))

    assert result.returncode == 0, result.stderr
    with open(token_file, encoding="utf-8") as f:
        assert f.read() == refresh + "\n"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert (f"To sign in, open https://login.example.test/device and enter the code "
            f"{USER_CODE}") in result.stdout
    assert result.stdout.splitlines()[-1] == f"refresh token written to {token_file}"
    assert_secret_free(result.stdout + result.stderr, refresh, client_secret,
                       "device-code-secret", answer["access_token"])
    assert endpoints.requests("/device") == [
        {"client_id": CLIENT_ID, "scope": "https://outlook.office.com/SMTP.Send offline_access"}]
    assert endpoints.requests("/token") == 3 * [
        {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
         "device_code": "device-code-secret", "client_id": CLIENT_ID,
         "client_secret": client_secret}]


def test_device_flow_slows_down_when_asked(endpoints, token_file):
    refresh = secret("refresh")
    endpoints.resource.device_answers.append(device_code_answer())
    endpoints.resource.token_answers += [
        (400, {"error": "slow_down"}), (200, endpoints.resource.tokens(refresh_token=refresh))]

    result = run(device_command(endpoints, token_file))

    assert result.returncode == 0, result.stderr
    with open(token_file, encoding="utf-8") as f:
        assert f.read().strip() == refresh
    times = [when for where, _, when in endpoints.resource.requests]
    assert [where for where, _, _ in endpoints.resource.requests] == [
        "/device", "/token", "/token"]
    assert 0.8 <= times[1] - times[0] < 5  # the interval the endpoint asked for: 1 s
    assert times[2] - times[1] >= 5.8  # 1 + 5 after slow_down


def test_device_flow_waits_no_longer_than_its_timeout(endpoints, token_file, tmp_path):
    """An endpoint asking for a long interval does not make the flow outlast --timeout,
    and a client secret file that is no secret is refused (not read to its end)."""
    endpoints.resource.device_answers.append(device_code_answer(interval=3600))
    endpoints.resource.token_answers += [PENDING, PENDING]
    command = device_command(endpoints, token_file)
    command[command.index("--timeout") + 1] = "2"
    result = run(command)
    assert_failed(result, "no sign-in within 2 s, nothing written")
    assert not os.path.exists(token_file)
    assert len(endpoints.requests("/token")) == 1  # once, when the 2 s were up
    huge = tmp_path / "client-secret"
    huge.write_text("x" * 100_000)
    result = run(device_command(endpoints, token_file, "--client-secret-file", str(huge)))
    assert result.returncode != 0 and "longer than 65536 characters" in result.stderr
    assert "x" * 100 not in result.stderr


def test_an_interrupted_sign_in_fails(endpoints, token_file):
    """Ctrl-C while waiting: a failure a script can see, and nothing written."""
    import signal

    endpoints.resource.device_answers.append(device_code_answer())
    endpoints.resource.token_answers += [PENDING] * 20
    process = subprocess.Popen(device_command(endpoints, token_file), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("Waiting for the sign-in"):
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert err == "smtpbridge: oauth-login: interrupted, nothing written\n"
    assert not os.path.exists(token_file)


def test_device_flow_access_denied(endpoints, token_file):
    endpoints.resource.device_answers.append(device_code_answer())
    endpoints.resource.token_answers += [
        PENDING, (400, {"error": "access_denied", "error_description": "The user declined."})]

    result = run(device_command(endpoints, token_file))

    line = assert_failed(result)
    assert line == (f"smtpbridge: oauth-login: token request to 127.0.0.1:"
                    f"{endpoints.port.getHost().port} failed: access_denied: "
                    "The user declined.")
    assert not os.path.exists(token_file)


def test_device_authorization_error_is_reported(endpoints, token_file):
    endpoints.resource.device_answers.append(
        (400, {"error": "invalid_scope", "error_description": "Scope not allowed\nTrace"}))

    result = run(device_command(endpoints, token_file, "--scope", "https://mail.google.com/"))

    assert_failed(result, "device authorization request to", "invalid_scope: Scope not allowed")
    assert endpoints.requests("/device")[0]["scope"] == "https://mail.google.com/"
    assert endpoints.requests("/token") == []


def test_an_answer_without_refresh_token_writes_nothing(endpoints, token_file):
    endpoints.resource.device_answers.append(device_code_answer())
    answer = endpoints.resource.tokens()
    endpoints.resource.token_answers.append((200, answer))

    result = run(device_command(endpoints, token_file))

    assert_failed(result, "no refresh token", "offline_access", "access_type=offline")
    assert not os.path.exists(token_file)
    assert os.listdir(os.path.dirname(token_file)) == []
    assert_secret_free(result.stdout + result.stderr, answer["access_token"])


def test_an_untrusted_endpoint_certificate(endpoints, token_file):
    command = device_command(endpoints, token_file)
    where = command.index("--ca-certificates")
    del command[where:where + 2]

    result = run(command)

    assert_failed(result, "device authorization request to", "TLS failed")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("arguments", "reason"), [
    (["--flow", "device", "--scope", "s"], "--token-url is needed without --provider"),
    (["--scope", "s", "--token-url", "https://x.test/t"], "--flow is needed"),
    (["--provider", "google", "--tenant", "t"], "--tenant is only used with --provider "
     "microsoft"),
    (["--provider", "google", "--token-url", "http://x.test/t"],
     "--token-url must be an https:// URL"),
    (["--provider", "google", "--client-secret-file", "/nonexistent/secret"],
     "cannot read the client secret file /nonexistent/secret"),
    (["--provider", "microsoft"], "--tenant is needed with --provider microsoft: the "
     "Directory (tenant) ID or domain of the app registration"),
    (["--provider", "google", "--proxy", "https://proxy.example:3128"],
     "--proxy: must be http://HOST:PORT"),
    (["--provider", "google", "--owner", "no-such-user-4f2"],
     "--owner: there is no user no-such-user-4f2"),
])
def test_unusable_options(token_file, arguments, reason):
    result = run([SMTPBRIDGE, "oauth-login", "--client-id", CLIENT_ID,
                  "--refresh-token-file", token_file, *arguments])
    assert_failed(result, reason)


def test_an_unwritable_token_file_fails_before_the_sign_in(endpoints, tmp_path):
    result = run(device_command(endpoints, str(tmp_path / "missing" / "token")))
    assert_failed(result, "cannot write", "missing or not writable")
    assert endpoints.resource.requests == []


# --- the token file's owner, a proxy -----------------------------------------------------

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@ROOT_ONLY
def test_owner_gives_the_file_to_the_bridges_user(endpoints, token_file, tmp_path):
    nobody = pwd.getpwnam("nobody")
    endpoints.resource.device_answers.append(device_code_answer())
    refused = run(device_command(endpoints, token_file, "--owner", "nobody"))
    directory = tmp_path / "secrets"
    assert_failed(refused, f"nobody cannot write the directory {directory}, where the "
                           f"bridge replaces the rotated token: chown nobody {directory}")
    assert endpoints.resource.requests == []
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    refresh = secret("refresh")
    endpoints.resource.token_answers.append((200, endpoints.resource.tokens(
        refresh_token=refresh)))

    result = run(device_command(endpoints, token_file, "--owner", "nobody"))

    assert result.returncode == 0, result.stderr
    info = os.stat(token_file)
    assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert result.stdout.splitlines()[-1] == \
        f"refresh token written to {token_file} (owned by nobody)"
    assert "note:" not in result.stdout


@ROOT_ONLY
def test_root_without_owner_is_told_about_it(endpoints, token_file):
    endpoints.resource.device_answers.append(device_code_answer())
    endpoints.resource.token_answers.append((200, endpoints.resource.tokens(
        refresh_token=secret("refresh"))))
    result = run(device_command(endpoints, token_file))
    assert result.returncode == 0, result.stderr
    assert f"note: {token_file} will belong to root; the bridge must read and replace it " \
           "as its own user: give --owner USER" in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root may give files away")
def test_owner_needs_root(token_file):
    other = "root"
    result = run([SMTPBRIDGE, "oauth-login", "--provider", "google", "--client-id", CLIENT_ID,
                  "--refresh-token-file", token_file, "--owner", other])
    assert_failed(result, f"--owner {other} needs root")


def test_proxy_credentials_are_never_taken_on_the_command_line(endpoints, token_file):
    result = run(device_command(endpoints, token_file, "--proxy",
                                "http://bob:pw-on-argv@127.0.0.1:3128"), env={})
    line = assert_failed(result, "--proxy: credentials are not written on the command line",
                         "HTTPS_PROXY")
    assert_secret_free(line + result.stdout, "pw-on-argv")
    assert endpoints.resource.requests == []  # refused before anything was asked


@pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="tinyproxy is not installed")
@pytest.mark.parametrize("how", ["--proxy", "HTTPS_PROXY"])
def test_the_login_goes_through_a_proxy(endpoints, token_file, tmp_path, how):
    proxy = start_proxy(str(tmp_path / "proxy"))
    try:
        endpoints.resource.device_answers.append(device_code_answer())
        endpoints.resource.token_answers += [PENDING, (200, endpoints.resource.tokens(
            refresh_token=secret("refresh")))]
        command = device_command(endpoints, token_file)
        if how == "--proxy":
            result = run([*command, "--proxy", proxy.url], env={})
        else:
            result = run(command, env={"HTTPS_PROXY": proxy.url})
        assert result.returncode == 0, result.stderr
        host = f"127.0.0.1:{endpoints.port.getHost().port}"
        assert proxy.tunnels() == [host] * 3  # /device, /token twice
    finally:
        proxy.stop()


# --- authorization code flow with PKCE --------------------------------------------------

class Running:
    """The command running in the background, its stdout read line by line."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def line_starting(self, prefix: str) -> str:
        deadline = time.monotonic() + 30
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            self.seen.append(line)
            if line.startswith(prefix):
                return line.rstrip("\n")

    def finish(self) -> tuple[int, str, str]:
        """The exit status, all of stdout and stderr."""
        assert self.process.stderr is not None
        code = self.process.wait(timeout=30)
        stderr = self.process.stderr.read()
        time.sleep(0.1)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, "".join(self.seen), stderr


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for one in started:
        if one.process.poll() is None:
            one.process.kill()
        one.process.wait()
        for stream in (one.process.stdout, one.process.stderr):
            if stream is not None:
                stream.close()


def start_code_flow(endpoints: Endpoints, token_file: str, running: list[Running],
                    tmp_path: Any, client_secret: str) -> tuple[Running, dict[str, str]]:
    """Start a Google login; the query of the URL it prints."""
    (tmp_path / "client-secret").write_text(client_secret)
    one = Running([
        SMTPBRIDGE, "oauth-login", "--provider", "google", "--client-id", CLIENT_ID,
        "--client-secret-file", str(tmp_path / "client-secret"),
        "--scope", "https://mail.google.com/", "--refresh-token-file", token_file,
        "--login-hint", "scans@example.com", "--authorize-url",
        endpoints.url("/authorize?hd=example.com"), "--token-url", endpoints.url("/token"),
        "--ca-certificates", endpoints.ca, "--timeout", "60"])
    running.append(one)
    line = one.line_starting("Open this URL")
    prefix = "Open this URL in a browser on this machine (or forward port "
    assert line.startswith(prefix)
    port, _, url = line[len(prefix):].partition("): ")
    assert url.startswith(endpoints.url("/authorize?hd=example.com&"))
    query = {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}
    assert query["redirect_uri"] == f"http://127.0.0.1:{port}/"
    return one, query


def browse(url: str) -> tuple[int, str]:
    """GET C{url} as the browser would (no proxy): the status and the page."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_code_flow_with_pkce(endpoints, token_file, running, tmp_path):
    client_secret, refresh, code = secret("client-secret"), secret("refresh"), secret("code")
    one, query = start_code_flow(endpoints, token_file, running, tmp_path, client_secret)
    assert {key: query[key] for key in ("response_type", "client_id", "scope",
                                        "code_challenge_method", "access_type", "prompt",
                                        "login_hint", "hd")} == {
        "response_type": "code", "client_id": CLIENT_ID, "scope": "https://mail.google.com/",
        "code_challenge_method": "S256", "access_type": "offline", "prompt": "consent",
        "login_hint": "scans@example.com", "hd": "example.com"}
    assert len(query["state"]) >= 16
    endpoints.resource.codes[code] = (query["code_challenge"], query["redirect_uri"])
    answer = endpoints.resource.tokens(refresh_token=refresh)
    endpoints.resource.token_answers.append((200, answer))

    assert browse(query["redirect_uri"] + "favicon.ico")[0] == 404
    status, page = browse(query["redirect_uri"] + "?" + urlencode(
        {"code": code, "state": query["state"], "scope": query["scope"]}))

    assert status == 200
    assert "smtpbridge: signed in, you can close this window" in page
    exit_code, stdout, stderr = one.finish()
    assert exit_code == 0, stderr
    with open(token_file, encoding="utf-8") as f:
        assert f.read() == refresh + "\n"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert stdout.splitlines()[-1] == f"refresh token written to {token_file}"
    assert_secret_free(stdout + stderr, refresh, answer["access_token"], client_secret, code)
    [form] = endpoints.requests("/token")
    assert form == {"grant_type": "authorization_code", "code": code,
                    "redirect_uri": query["redirect_uri"], "client_id": CLIENT_ID,
                    "code_verifier": form["code_verifier"], "client_secret": client_secret}
    assert 43 <= len(form["code_verifier"]) <= 128
    with pytest.raises(OSError):  # no longer listening
        browse(query["redirect_uri"])


def test_code_flow_refuses_a_wrong_state(endpoints, token_file, running, tmp_path):
    one, query = start_code_flow(endpoints, token_file, running, tmp_path, secret("cs"))

    status, page = browse(query["redirect_uri"] + "?" + urlencode(
        {"code": "code-1", "state": "forged"}))

    assert status == 400
    assert "sign-in failed" in page
    exit_code, _, stderr = one.finish()
    assert_failed(subprocess.CompletedProcess([], exit_code, "", stderr),
                  "state does not match")
    assert not os.path.exists(token_file)
    assert endpoints.resource.requests == []


def test_code_flow_reports_a_refused_sign_in(endpoints, token_file, running, tmp_path):
    one, query = start_code_flow(endpoints, token_file, running, tmp_path, secret("cs"))

    status, page = browse(query["redirect_uri"] + "?" + urlencode(
        {"error": "access_denied", "error_description": "The user said no",
         "state": query["state"]}))

    assert status == 400
    assert "access_denied" in page
    exit_code, _, stderr = one.finish()
    line = assert_failed(subprocess.CompletedProcess([], exit_code, "", stderr))
    assert line == ("smtpbridge: oauth-login: the sign-in was refused: access_denied: "
                    "The user said no")
    assert not os.path.exists(token_file)


def test_code_flow_token_answer_without_refresh_token(endpoints, token_file, running,
                                                       tmp_path):
    one, query = start_code_flow(endpoints, token_file, running, tmp_path, secret("cs"))
    endpoints.resource.codes["code-1"] = (query["code_challenge"], query["redirect_uri"])
    endpoints.resource.token_answers.append((200, endpoints.resource.tokens()))

    assert browse(query["redirect_uri"] + "?" + urlencode(
        {"code": "code-1", "state": query["state"]}))[0] == 200

    exit_code, _, stderr = one.finish()
    assert_failed(subprocess.CompletedProcess([], exit_code, "", stderr), "no refresh token")
    assert not os.path.exists(token_file)
