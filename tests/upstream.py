"""A real SMTP upstream for tests: aiosmtpd on loopback, with STARTTLS and AUTH required.

``start_upstream(directory, ...)`` starts one (in aiosmtpd's own thread and
asyncio loop) and returns an L{Upstream}: where it listens, the CA bundle that
trusts it, its account, the messages it stored and every byte it received in
clear text.  The ``upstream`` fixture gives the default one, ``upstream_factory``
starts others with options; both stop theirs after the test.  pytest finds
fixtures by module attribute, so import them by name and mention them once
(which also keeps ruff from taking the test arguments for redefinitions)::

    from tests.upstream import Upstream, upstream, upstream_factory

    FIXTURES = (upstream, upstream_factory)

Certificates are issued at test time by a throw-away CA; the bundle at
``Upstream.ca_file`` holds that CA and one unrelated CA, as real bundles hold
many.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attr
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smtpbridge.config import Secret
from smtpbridge.model import Route, UpstreamAccount

USERNAME = "relay@example.com"
PASSWORD = "upstream-pass-7"
HOST = "localhost"  # the name clients connect to; the server listens on 127.0.0.1


# Certificates.

@attr.frozen
class _Issuer:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@functools.cache
def _ca(common_name: str) -> _Issuer:
    """A self-signed CA, made once per test run."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                     False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _Issuer(key, certificate)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def write_ca_bundle(path: str, trust_test_ca: bool = True) -> str:
    """A PEM bundle of an unrelated CA, then (unless told not to) the test CA; returns C{path}."""
    pems = [_pem(_ca("Unrelated Test CA").certificate)]
    if trust_test_ca:
        pems.append(_pem(_ca("Test CA").certificate))
    with open(path, "wb") as f:
        f.write(b"".join(pems))
    return path


def write_certificate(directory: str, names: Iterable[str], expired: bool = False,
                      ) -> tuple[str, str]:
    """A server certificate from the test CA for exactly C{names}: (certificate, key) paths."""
    names = list(names)
    issuer = _ca("Test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(days=10 if expired else 1)
    end = now - datetime.timedelta(days=2) if expired else now + datetime.timedelta(days=7)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0])).issuer_name(issuer.certificate.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuer.key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, f"{names[0]}.crt")
    key_path = os.path.join(directory, f"{names[0]}.key")
    with open(cert_path, "wb") as f:
        f.write(_pem(certificate) + _pem(issuer.certificate))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


# The server.

@attr.define
class StoredMessage:
    """One message the upstream accepted."""

    sender: str
    recipients: list[str]
    content: bytes  # exactly as received, unstuffed, CRLF line endings
    mail_options: list[str]
    rcpt_options: list[str]

    @property
    def sent(self) -> bytes:
        """The content as the bridge's client sent it (the bridge's Received: removed)."""
        from tests.conftest import without_bridge_trace

        return without_bridge_trace(self.content)


@attr.define
class Upstream:
    """A running upstream and what it saw; C{lock} guards the lists (another thread fills them)."""

    controller: Controller
    host: str
    port: int
    ca_file: str
    tls: str
    username: str
    password: str
    messages: list[StoredMessage] = attr.Factory(list)
    logins: list[tuple[str, str, bool]] = attr.Factory(list)  # (mechanism, user, accepted)
    received: list[tuple[bool, bytes]] = attr.Factory(list)  # (under TLS, bytes)
    sni: list[str | None] = attr.Factory(list)  # the server name of each TLS handshake
    lock: threading.Lock = attr.Factory(threading.Lock)

    def tables(self, password_file: Any, timeout: int = 60) -> str:
        """The bridge's [upstream] and [credentials] tables for this upstream, its password
        in C{password_file}."""
        return f"""[upstream]
host = "{self.host}"
port = {self.port}
tls = "{self.tls}"
ca_certificates = "{self.ca_file}"
timeout = {timeout}

[credentials]
username = "{self.username}"
password_file = "{password_file}"
"""

    def route(self, **changes: Any) -> Route:
        """A route to this upstream that trusts its CA."""
        values = {"host": self.host, "port": self.port, "tls": self.tls,
                  "ca_certificates": self.ca_file, "timeout": 10.0}
        values.update(changes)
        return Route(**values)

    def account(self, password: str | None = None, username: str | None = None,
                ) -> UpstreamAccount:
        """Its account; give C{password} for a wrong one."""
        return UpstreamAccount(username or self.username,
                               Secret(self.password if password is None else password))

    def under_tls(self) -> bytes:
        """Every byte received under TLS, over all connections."""
        with self.lock:
            return b"".join(data for tls, data in self.received if tls)

    def clear_text(self) -> bytes:
        """Every byte received before TLS, over all connections."""
        with self.lock:
            return b"".join(data for tls, data in self.received if not tls)

    def stored(self) -> list[StoredMessage]:
        with self.lock:
            return list(self.messages)

    def stop(self) -> None:
        if self.controller._thread is not None:
            self.controller.stop()


class _Handler:
    """Stores messages; refuses chosen recipients; may answer the final dot with a failure."""

    def __init__(self, upstream: Upstream | None, reject: dict[str, str],
                 data_reply: str | None) -> None:
        self.upstream = upstream
        self.reject = reject
        self.data_reply = data_reply

    async def handle_RCPT(self, server: SMTP, session: Any, envelope: Any,  # noqa: N802
                          address: str, rcpt_options: list[str]) -> str:
        if address in self.reject:
            return self.reject[address]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.data_reply is not None:
            return self.data_reply
        assert self.upstream is not None
        message = StoredMessage(envelope.mail_from, list(envelope.rcpt_tos),
                                bytes(envelope.original_content), list(envelope.mail_options),
                                list(envelope.rcpt_options))
        with self.upstream.lock:
            self.upstream.messages.append(message)
        return "250 2.0.0 OK queued"


_IMPLICIT_TLS: Any = object()


class _RecordingSMTP(SMTP):
    """aiosmtpd's server, keeping every byte it receives with whether TLS was on."""

    def __init__(self, *args: Any, upstream: Upstream, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._upstream = upstream
        if upstream.tls == "implicit":
            # aiosmtpd counts only STARTTLS as TLS; this lets it offer AUTH
            # (auth_require_tls) on an implicit TLS connection too.
            self._tls_protocol = _IMPLICIT_TLS

    def data_received(self, data: bytes) -> None:
        with self._upstream.lock:
            self._upstream.received.append((self._tls_protocol is not None, bytes(data)))
        super().data_received(data)


class _Controller(Controller):
    """A controller that may listen on port 0 and builds recording servers."""

    upstream: Upstream | None = None

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()

    def factory(self) -> SMTP:
        assert self.upstream is not None
        return _RecordingSMTP(self.handler, upstream=self.upstream, **self.SMTP_kwargs)


def start_upstream(
    directory: str | None = None,
    *,
    starttls: bool = True,
    implicit_tls: bool = False,
    certificate_names: Iterable[str] = (HOST, "127.0.0.1"),
    expired_certificate: bool = False,
    auth_mechanisms: Iterable[str] = ("PLAIN", "LOGIN"),
    auth_required: bool = True,
    username: str = USERNAME,
    password: str = PASSWORD,
    reject_recipients: dict[str, str] | None = None,
    data_reply: str | None = None,
    smtputf8: bool = True,
    max_tls_version: ssl.TLSVersion | None = None,
    port: int = 0,
) -> Upstream:
    """Start an upstream on 127.0.0.1 (a free port); stop it with C{Upstream.stop()}.

    By default it requires STARTTLS, then AUTH (PLAIN or LOGIN) with C{username}
    and C{password}.  C{starttls=False}: no STARTTLS offered at all (and AUTH
    only over TLS, so never).  C{implicit_tls}: TLS from the first byte.
    C{certificate_names}: the names its certificate is valid for.
    C{reject_recipients}: address -> reply such as "550 5.1.1 No such user".
    C{data_reply}: the reply to the final dot instead of storing the message.
    C{max_tls_version}: the newest TLS version it speaks.  C{port}: where to listen (0:
    a port the OS picks).  The server names clients ask for (SNI) are recorded in
    C{Upstream.sni}.
    """
    directory = directory or tempfile.mkdtemp(prefix="upstream-")
    os.makedirs(directory, exist_ok=True)
    context = None
    if starttls or implicit_tls:
        cert, key = write_certificate(directory, certificate_names, expired_certificate)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        if max_tls_version is not None:
            context.maximum_version = max_tls_version

        def record_sni(connection: Any, name: str | None, context: Any) -> None:
            with upstream_box[0].lock:
                upstream_box[0].sni.append(name)

        context.sni_callback = record_sni
    handler = _Handler(None, dict(reject_recipients or {}), data_reply)
    upstream_box: list[Upstream] = []

    def authenticator(server: SMTP, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user = auth_data.login.decode("utf-8", "replace")
        ok = user == username and auth_data.password == password.encode("utf-8")
        with upstream_box[0].lock:
            upstream_box[0].logins.append((mechanism, user, ok))
        return AuthResult(success=ok, auth_data=auth_data if ok else None, handled=False)

    offered = {name.upper() for name in auth_mechanisms}
    controller = _Controller(
        handler, hostname="127.0.0.1", port=port, server_hostname="upstream.test",
        ssl_context=context if implicit_tls else None,
        tls_context=None if implicit_tls else context,
        require_starttls=starttls and not implicit_tls,
        auth_required=auth_required, auth_require_tls=True, authenticator=authenticator,
        auth_exclude_mechanism=[m for m in ("PLAIN", "LOGIN") if m not in offered],
        decode_data=False, enable_SMTPUTF8=smtputf8,
    )
    upstream = Upstream(controller, HOST, 0, write_ca_bundle(os.path.join(directory, "ca.pem")),
                        "implicit" if implicit_tls else "starttls", username, password)
    upstream_box.append(upstream)
    handler.upstream = upstream
    controller.upstream = upstream
    controller.start()
    upstream.port = controller.port
    with upstream.lock:
        upstream.received.clear()  # the controller's own start-up probe
    return upstream


def commands(stream: bytes) -> list[bytes]:
    """The command lines of an SMTP client stream, leaving out what was sent after DATA."""
    result = []
    in_data = False
    for line in stream.split(b"\r\n"):
        if in_data:
            in_data = line != b"."
        else:
            result.append(line)
            in_data = line.upper() == b"DATA"
    return result


@pytest.fixture
def upstream(tmp_path: Any) -> Iterator[Upstream]:
    """The default upstream: STARTTLS and AUTH required, a certificate for localhost."""
    running = start_upstream(str(tmp_path / "upstream"))
    yield running
    running.stop()


@pytest.fixture
def upstream_factory(tmp_path: Any) -> Iterator[Callable[..., Upstream]]:
    """C{start_upstream} with the test's options; every upstream started is stopped after it."""
    started: list[Upstream] = []

    def start(**options: Any) -> Upstream:
        directory = tmp_path / f"upstream-{len(started)}"
        started.append(start_upstream(str(directory), **options))
        return started[-1]

    yield start
    for running in started:
        running.stop()
