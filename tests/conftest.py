"""Shared fixtures: a reactor thread, test certificates and a running bridge on loopback."""

from __future__ import annotations

import glob
import os
import ssl
import threading
from collections.abc import Iterator

import attr
import pytest
from hypothesis import settings
from twisted.internet import reactor as global_reactor
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import eventAsText, formatEvent, globalLogPublisher

from smtpbridge.config import parse_config
from smtpbridge.demo import MailFolderDelivery, demo_upstream_factory
from smtpbridge.listener import ListenerService
from smtpbridge.service import make_service
from smtpbridge.tls import ServerTLS, create_self_signed, server_context
from smtpbridge.users import hash_password

# CI runs the property tests reproducibly; elsewhere each run explores new examples.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Files the tests write (passwords, keys, tokens) are the bridge's secrets: like an
# administrator's, they are readable by their owner only, or the bridge refuses them.
os.umask(0o077)

USER = "device"
PASSWORD = "device-pass-1"  # noqa: S105 - a test account
UPSTREAM_USER = "bridge"
UPSTREAM_PASSWORD = "upstream-pass-1"  # noqa: S105 - a test account


@pytest.fixture(scope="session")
def reactor() -> Iterator[object]:
    """The global reactor, running in a thread for the whole session."""
    thread = threading.Thread(target=global_reactor.run,
                              kwargs={"installSignalHandlers": False}, daemon=True)
    thread.start()
    yield global_reactor
    global_reactor.callFromThread(global_reactor.stop)
    thread.join(10)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for localhost/127.0.0.1: (certificate, key) paths."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    create_self_signed(cert, key, "localhost")
    return cert, key


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("users") / "users"
    path.write_text(f"{USER}:{hash_password(PASSWORD, n=2**10)}\n", encoding="utf-8")
    return str(path)


def client_context(certificate: tuple[str, str]) -> ssl.SSLContext:
    """A client TLS context that trusts the test certificate."""
    context = ssl.create_default_context(cafile=certificate[0])
    return context


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log event of the test as text: formatted, with any traceback, and its fields."""
    lines: list[str] = []

    def observer(event: dict) -> None:
        lines.append(formatEvent(event) or "")
        lines.append(eventAsText(event, includeTimestamp=False) or "")
        lines.append(repr(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


@attr.define
class RunningBridge:
    service: object
    ports: dict[str, int]


def start_bridge(reactor: object, toml: str, directory: str) -> RunningBridge:
    """Start the bridge described by C{toml} (ports 0: the OS picks) in the reactor thread."""
    if "[spool]" not in toml:
        # The tests of in-line relaying see the upstream's own verdicts; the spool's
        # tests ask for it.
        toml += f'\n[spool]\nmode = "never"\ndirectory = "{directory}/spool"\n'
    path = os.path.join(directory, "smtpbridge.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(toml)
    config = parse_config(toml, path)

    def start() -> object:
        service = make_service(config, reactor)
        service.startService()
        return service

    service = blockingCallFromThread(reactor, start)
    ports = {}
    for child in service:
        if isinstance(child, ListenerService):
            ports[child.name.removeprefix("listener ")] = child.port.getHost().port
    return RunningBridge(service, ports)


def stop_bridge(reactor: object, bridge: RunningBridge) -> None:
    blockingCallFromThread(reactor, bridge.service.stopService)


@attr.define
class DemoUpstream:
    """Our own demo upstream (STARTTLS + AUTH, .eml files) listening on loopback."""

    port: object
    mail_dir: str

    @property
    def number(self) -> int:
        return self.port.getHost().port

    def messages(self) -> list[bytes]:
        return stored_messages(self.mail_dir)


def without_bridge_trace(data: bytes) -> bytes:
    """The message as the client sent it: the one Received: header the bridge adds at the
    top (checked to be there) removed."""
    assert data.startswith(b"Received: "), data[:80]
    end = data.index(b"\r\n") + 2
    while data[end:end + 1] == b"\t":
        end = data.index(b"\r\n", end) + 2
    assert b"(smtpbridge, listener " in data[:end], data[:end]
    return data[end:]


def stored_messages(mail_dir: str) -> list[bytes]:
    """Every message stored in a demo mail folder, oldest first, without the bridge's
    Received: header."""
    paths = sorted(glob.glob(os.path.join(mail_dir, "new", "*.eml")), key=os.path.getmtime)
    result = []
    for path in paths:
        with open(path, "rb") as f:
            result.append(without_bridge_trace(f.read()))
    return result


@pytest.fixture
def demo_upstream(reactor: object, certificate: tuple[str, str],
                  tmp_path) -> Iterator[DemoUpstream]:
    mail_dir = str(tmp_path / "upstream-mail")

    def start() -> object:
        context = server_context(*certificate)
        factory = demo_upstream_factory(MailFolderDelivery(mail_dir), UPSTREAM_USER,
                                        UPSTREAM_PASSWORD, ServerTLS(context), reactor)
        return reactor.listenTCP(0, factory, interface="127.0.0.1")

    port = blockingCallFromThread(reactor, start)
    yield DemoUpstream(port, mail_dir)
    blockingCallFromThread(reactor, port.stopListening)


def front_toml(certificate: tuple[str, str], users_file: str, hostname: str = "localhost",
               max_message_size: int = 41943040) -> str:
    """The client side of a test bridge: an implicit-TLS listener "smtps" (AUTH required) and
    a STARTTLS listener "legacy" (AUTH optional for 127.0.0.0/8), on ports the OS picks."""
    cert, key = certificate
    return f"""
[server]
hostname = "{hostname}"
max_message_size = {max_message_size}

[tls]
certificate = "{cert}"
key = "{key}"

[[listener]]
name = "smtps"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
auth = "required"

[[listener]]
name = "legacy"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "starttls"
auth = "optional"

[access]
trusted_networks = ["127.0.0.0/8"]
users_file = "{users_file}"
"""


@pytest.fixture
def bridge_config(certificate: tuple[str, str], users_file: str, tmp_path,
                  demo_upstream: DemoUpstream) -> str:
    """The TOML of a bridge with an implicit-TLS and a STARTTLS listener, on loopback,
    relaying to the demo upstream."""
    cert = certificate[0]
    (tmp_path / "upstream-password").write_text(UPSTREAM_PASSWORD + "\n")
    return front_toml(certificate, users_file) + f"""
[upstream]
host = "localhost"
port = {demo_upstream.number}
ca_certificates = "{cert}"
timeout = 20

[credentials]
username = "{UPSTREAM_USER}"
password_file = "{tmp_path}/upstream-password"
"""


@pytest.fixture
def bridge(reactor: object, bridge_config: str, tmp_path) -> Iterator[RunningBridge]:
    running = start_bridge(reactor, bridge_config, str(tmp_path))
    yield running
    stop_bridge(reactor, running)
