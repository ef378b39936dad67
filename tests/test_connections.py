"""What each connection costs: no Nagle stall on either side, one write per reply and per
batch of body lines, upstream names looked up once a minute, upstream TLS options built
once and again on SIGHUP, the start-up heap frozen."""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import blockingCallFromThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from smtpbridge import connector as connector_module
from smtpbridge.client import UpstreamProtocol
from smtpbridge.connector import UpstreamConnector, set_up
from smtpbridge.errors import Unreachable, UpstreamError
from smtpbridge.lines import no_delay
from smtpbridge.listener import CertificateReloader, HeapFreezer, ImplicitTLSFactory
from smtpbridge.model import Route
from smtpbridge.names import CachingResolver
from smtpbridge.networks import NetworkSet
from smtpbridge.policy import AccessPolicy
from smtpbridge.server import ListenerSettings, SMTPServerFactory, SMTPServerProtocol
from smtpbridge.testing import MemoryDelivery
from smtpbridge.tls import ServerTLS, server_context
from smtpbridge.upstreamsession import UpstreamSession
from tests.test_upstream_contract import Producer
from tests.upstream import Upstream, upstream, upstream_factory, write_ca_bundle

FIXTURES = (upstream, upstream_factory)  # pytest finds fixtures by module attribute


def wait_for(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# TCP_NODELAY.

class RecordingFactory(SMTPServerFactory):
    """Keeps the sessions it builds, so the test can look at their connections."""

    built: list[SMTPServerProtocol]

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:  # noqa: N802
        protocol = super().buildProtocol(addr)
        self.built.append(protocol)
        return protocol


@pytest.fixture
def listening(reactor: Any, certificate: tuple[str, str]) -> Iterator[Any]:
    """Starts a listener (tls "implicit" or "starttls") on loopback; its factory and port."""
    ports: list[Any] = []

    def start(tls: str) -> tuple[RecordingFactory, int]:
        server_tls = ServerTLS(server_context(*certificate))
        factory = RecordingFactory(ListenerSettings("test", "bridge.test", tls=tls),
                                   MemoryDelivery(), AccessPolicy(NetworkSet.parse([])), None,
                                   reactor, server_tls)
        factory.built = []
        wrapped: Any = ImplicitTLSFactory(server_tls, False, factory) \
            if tls == "implicit" else factory
        port = blockingCallFromThread(reactor, reactor.listenTCP, 0, wrapped,
                                      interface="127.0.0.1")
        ports.append(port)
        return factory, port.getHost().port

    yield start
    for port in ports:
        blockingCallFromThread(reactor, port.stopListening)


def tcp_of(transport: Any) -> Any:
    """The TCP transport beneath TLS wrappers."""
    while not hasattr(type(transport), "getTcpNoDelay"):
        transport = transport.transport
    return transport


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_client_connections_send_without_delay(reactor: Any, listening: Any, tls: str) -> None:
    factory, port = listening(tls)
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        wait_for(lambda: factory.built)
        [session] = factory.built
        assert blockingCallFromThread(
            reactor, lambda: tcp_of(session.transport).getTcpNoDelay()), tls


def test_upstream_connections_send_without_delay(reactor: Any, upstream: Upstream) -> None:
    connector = UpstreamConnector(reactor, "bridge.test")
    session = blockingCallFromThread(reactor, connector.connect, upstream.route(),
                                     upstream.account())
    try:
        assert blockingCallFromThread(
            reactor, lambda: tcp_of(session._protocol.transport).getTcpNoDelay())
    finally:
        blockingCallFromThread(reactor, session.quit)


def test_no_delay_is_harmless_without_tcp() -> None:
    assert no_delay(StringTransport()) is False


def test_an_implicit_tls_write_leaves_at_once(certificate: tuple[str, str]) -> None:
    """A reply becomes its TLS record when it is written, not on the reactor's next turn
    (Twisted's own TLS transport waits for that turn, to gather small writes)."""
    clock = Clock()
    server_side = ImplicitTLSFactory(ServerTLS(server_context(*certificate)), False,
                                     Factory.forProtocol(Protocol), clock)
    client_side = TLSMemoryBIOFactory(CertificateOptions(), True,
                                      Factory.forProtocol(Protocol), clock)
    client, server, pump = connectedServerAndClient(
        lambda: server_side.buildProtocol(None), lambda: client_side.buildProtocol(None),
        greet=False)
    pump.flush()  # the handshake
    assert server.transport.stream == []
    server.write(b"220 bridge.test ESMTP\r\n")
    assert len(server.transport.stream) == 1  # a record, with the clock where it was
    assert clock.getDelayedCalls() == []


# One write per reply and per batch of body lines.

class CountingTransport(StringTransport):
    """Counts the write calls (each would be a TLS record and a segment of its own)."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def startTLS(self, options: object) -> None:  # noqa: N802
        pass


def test_a_multi_line_reply_is_one_write() -> None:
    factory = SMTPServerFactory(ListenerSettings("test", "bridge.test", auth_required=False),
                                MemoryDelivery(), AccessPolicy(NetworkSet.parse([])), None,
                                Clock())
    protocol = factory.buildProtocol(None)
    transport = CountingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    assert transport.writes == 1  # the greeting
    protocol.dataReceived(b"EHLO device.example\r\n")
    assert transport.writes == 2
    assert transport.value().count(b"\r\n250") >= 5  # of six lines


class TLSRecordingTransport(CountingTransport):
    """What had been written when STARTTLS began, and when the connection was closed."""

    at_starttls: bytes | None = None
    at_close: bytes | None = None

    def startTLS(self, options: object) -> None:  # noqa: N802
        self.at_starttls = self.value()

    def loseConnection(self) -> None:  # noqa: N802
        self.at_close = self.value()
        super().loseConnection()


def session_on(transport: CountingTransport, tls: str = "none") -> SMTPServerProtocol:
    settings = ListenerSettings("test", "bridge.test", auth_required=False, tls=tls)
    factory = SMTPServerFactory(settings, MemoryDelivery(), AccessPolicy(NetworkSet.parse([])),
                                None, Clock(), object() if tls != "none" else None)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    return protocol


def test_the_replies_to_one_read_are_one_write() -> None:
    transport = CountingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol = session_on(transport)
    transport.clear()
    protocol.dataReceived(b"NOOP\r\nHELO device.example\r\nNOOP\r\nRSET\r\n")
    assert transport.writes == 2  # the greeting, then the four replies together
    assert [line[:3] for line in transport.value().splitlines()] == [b"250"] * 4
    protocol.dataReceived(b"NOOP\r\n")
    assert transport.writes == 3


def test_gathered_replies_are_bounded() -> None:
    """A long pipelined burst is not held whole: replies leave each GATHER_LIMIT bytes."""
    from smtpbridge.serverbase import GATHER_LIMIT

    transport = CountingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol = session_on(transport)
    protocol.dataReceived(b"HELO device.example\r\n")
    transport.clear()
    before = transport.writes
    sizes: list[int] = []
    write = transport.write

    def sized(data: bytes) -> None:
        sizes.append(len(data))
        write(data)

    transport.write = sized  # type: ignore[method-assign]
    reply = len(b"250 2.0.0 Ok\r\n")
    count = 3 * GATHER_LIMIT // reply
    protocol.dataReceived(b"NOOP\r\n" * count)
    assert transport.value().count(b"\r\n") == count  # every reply, in order
    assert transport.writes - before == len(sizes) >= 3
    assert max(sizes) < GATHER_LIMIT + reply


def test_gathered_replies_leave_before_starttls_and_before_the_close() -> None:
    transport = TLSRecordingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol = session_on(transport, tls="starttls")
    protocol.dataReceived(b"EHLO device.example\r\nSTARTTLS\r\n")
    assert transport.at_starttls is not None
    assert transport.at_starttls.endswith(b"\r\n220 2.0.0 Ready to start TLS\r\n")
    transport = TLSRecordingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol = session_on(transport)
    protocol.dataReceived(b"NOOP\r\nQUIT\r\nNOOP\r\n")
    assert transport.at_close is not None
    assert [line[:3] for line in transport.at_close.splitlines()] == [b"220", b"250", b"221"]
    assert transport.value() == transport.at_close  # nothing after QUIT


def test_a_batch_of_body_lines_is_one_write() -> None:
    route = Route("smtp.example.com", 587)
    transport = CountingTransport()
    protocol = UpstreamProtocol(route, Clock())
    protocol.makeConnection(transport)
    results: list[Any] = []
    set_up(protocol, None, "bridge.test", object()).addBoth(results.append)
    for reply in (b"220 ready\r\n", b"250-x\r\n250 STARTTLS\r\n", b"220 go\r\n"):
        protocol.dataReceived(reply)
    protocol.handshakeCompleted()
    protocol.dataReceived(b"250-x\r\n250 8BITMIME\r\n")
    [session] = results
    assert isinstance(session, UpstreamSession)
    session.mail("a@example.com", {})
    protocol.dataReceived(b"250 ok\r\n")
    session.rcpt("b@example.com", {})
    protocol.dataReceived(b"250 ok\r\n")
    session.data(Producer())
    protocol.dataReceived(b"354 go\r\n")
    before = transport.writes
    session.write_lines([b"Subject: x", b"", b".dot"] + [b"line"] * 500)
    assert transport.writes == before + 1
    assert transport.value().endswith(b"\r\n..dot\r\n" + b"line\r\n" * 500)


# Host names.

@implementer(IResolutionReceiver)
class Receiver:
    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.done = False

    def resolutionBegan(self, resolution: Any) -> None:  # noqa: N802
        pass

    def addressResolved(self, address: Any) -> None:  # noqa: N802
        self.addresses.append(address)

    def resolutionComplete(self) -> None:  # noqa: N802
        self.done = True


class FakeResolver:
    """Answers on demand, and counts the questions."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.pending: list[Receiver] = []

    def resolveHostName(self, receiver: Any, host: str, port: int = 0,  # noqa: N802
                        types: Any = None, semantics: str = "TCP") -> Any:
        self.asked.append(host)
        self.pending.append(receiver)

    def answer(self, *hosts: str) -> None:
        for receiver in self.pending:
            for host in hosts:
                receiver.addressResolved(IPv4Address("TCP", host, 587))
            receiver.resolutionComplete()
        self.pending = []


def lookup(resolver: CachingResolver, host: str = "smtp.example.com") -> Receiver:
    receiver = Receiver()
    resolver.resolveHostName(receiver, host, 587)
    return receiver


def test_a_name_is_looked_up_once_per_ttl() -> None:
    inner, clock = FakeResolver(), Clock()
    names = CachingResolver(inner, clock, ttl=60)
    first, second = lookup(names), lookup(names)  # the second waits for the same lookup
    assert inner.asked == ["smtp.example.com"] and not first.done
    inner.answer("192.0.2.1", "192.0.2.2")
    assert first.done and second.done
    assert [a.host for a in second.addresses] == ["192.0.2.1", "192.0.2.2"]
    clock.advance(59)
    assert [a.host for a in lookup(names).addresses] == ["192.0.2.1", "192.0.2.2"]
    assert inner.asked == ["smtp.example.com"]
    clock.advance(1)
    later = lookup(names)
    assert inner.asked == ["smtp.example.com"] * 2 and not later.done
    inner.answer("192.0.2.3")
    assert [a.host for a in later.addresses] == ["192.0.2.3"]


def test_a_failed_lookup_is_not_kept() -> None:
    inner, clock = FakeResolver(), Clock()
    names = CachingResolver(inner, clock)
    failed = lookup(names)
    inner.answer()
    assert failed.done and failed.addresses == []
    lookup(names)
    assert len(inner.asked) == 2


def test_a_lookup_that_never_ends_gives_up_and_is_asked_again() -> None:
    from smtpbridge.names import LOOKUP_TIMEOUT

    inner, clock = FakeResolver(), Clock()
    names = CachingResolver(inner, clock)
    waiting = [lookup(names) for _ in range(3)]  # (a resolver that never answers)
    assert len(inner.asked) == 1 and not any(w.done for w in waiting)
    clock.advance(LOOKUP_TIMEOUT)
    assert all(w.done and w.addresses == [] for w in waiting)
    again = lookup(names)
    assert len(inner.asked) == 2 and not again.done
    stuck, fresh = inner.pending
    stuck.resolutionComplete()  # the lookup given up on ends at last, empty-handed
    assert not again.done  # its answer is not the new lookup's
    inner.pending = [fresh]
    inner.answer("192.0.2.1")
    assert [a.host for a in again.addresses] == ["192.0.2.1"]
    assert clock.getDelayedCalls() == []


def test_forget_asks_again() -> None:
    inner, clock = FakeResolver(), Clock()
    names = CachingResolver(inner, clock)
    lookup(names)
    inner.answer("192.0.2.1")
    names.forget("SMTP.example.com")
    lookup(names)
    assert len(inner.asked) == 2


def test_ip_literals_are_never_looked_up() -> None:
    inner = FakeResolver()
    names = CachingResolver(inner, Clock())
    assert lookup(names, "192.0.2.9").addresses == [IPv4Address("TCP", "192.0.2.9", 587)]
    assert lookup(names, "2001:db8::1").addresses == [IPv6Address("TCP", "2001:db8::1", 587)]
    assert inner.asked == []


def test_the_connector_looks_a_name_up_once_and_verifies_the_name(
        reactor: Any, upstream_factory: Any) -> None:
    # The certificate names only "localhost": a check against the address would fail.
    server = upstream_factory(certificate_names=["localhost"])
    connector = UpstreamConnector(reactor, "bridge.test")
    assert connector.names is not None
    for _ in range(3):
        session = blockingCallFromThread(reactor, connector.connect, server.route(),
                                         server.account())
        blockingCallFromThread(reactor, session.quit)
    assert connector.names.lookups == 1


def test_a_cached_address_still_needs_the_right_certificate(
        reactor: Any, upstream_factory: Any) -> None:
    server = upstream_factory(certificate_names=["wrong.example"])
    connector = UpstreamConnector(reactor, "bridge.test")
    for _ in range(2):
        with pytest.raises(UpstreamError) as caught:
            blockingCallFromThread(reactor, connector.connect, server.route(), server.account())
        assert caught.value.reply.code == 454 and "localhost" in caught.value.reply.text
    assert connector.names is not None and connector.names.lookups == 1


# A host that cannot be reached.

def closed_port() -> int:
    """A loopback port nothing listens on (the OS picked it, then it was closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_many_waiting_for_a_host_found_down_leave_its_slots_free(
        reactor: Any, upstream: Upstream) -> None:
    """Transactions waiting for a slot of a host that turns out unreachable all fail at
    once when the first attempt does, each handing the slot on: the hand-overs must not
    nest (a RecursionError would strand the slot, and the host's sessions with it)."""
    route = upstream.route(host="127.0.0.1", port=closed_port(), timeout=2, max_sessions=1)
    connector = UpstreamConnector(reactor, "bridge.test")

    def many() -> Deferred[list[Any]]:
        attempts = [connector.connect(route, upstream.account()) for _ in range(400)]
        return gatherResults([a.addErrback(lambda f: f.value) for a in attempts])

    answered = start(reactor, many)
    wait_for(lambda: answered)  # (not: stranded ones would wait 30 s for a slot)
    [errors] = answered
    assert len(errors) == 400 and all(isinstance(e, Unreachable) for e in errors)
    in_use = blockingCallFromThread(  # (the last hand-over is made a turn later)
        reactor, lambda: deferLater(reactor, 0.05, connector.slots.in_use, route))
    assert in_use == 0
    connector.forget_down()
    with pytest.raises(Unreachable):  # a new attempt gets the slot at once
        blockingCallFromThread(reactor, connector.connect, route, upstream.account())


def test_an_unreachable_host_is_not_tried_again_for_a_moment(
        reactor: Any, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connector_module, "DOWN_HOLD", 0.5)
    port = closed_port()
    route = upstream.route(host="127.0.0.1", port=port, timeout=2)
    connector = UpstreamConnector(reactor, "bridge.test")

    def connect() -> Any:
        return blockingCallFromThread(reactor, connector.connect, route, upstream.account())

    with pytest.raises(Unreachable) as first:
        connect()
    assert first.value.reply.code == 451 and "unreachable" in first.value.reply.text
    # Something listens there now; within the hold, nobody asks it.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        listener.settimeout(0.2)
        with pytest.raises(Unreachable) as held:
            connect()
        assert held.value is first.value
        with pytest.raises(socket.timeout):
            listener.accept()
        # `smtpbridge check` always tries for real.
        checking = start(reactor, lambda: connector.connect(route, upstream.account(),
                                                   progress=lambda *step: None))
        listener.settimeout(5)
        listener.accept()[0].close()
        wait_for(lambda: checking)
        time.sleep(0.5)  # the hold is over: the next transaction tries again
        again = start(reactor, lambda: connector.connect(route, upstream.account()))
        listener.accept()[0].close()
        wait_for(lambda: again)


def start(reactor: Any, call: Any) -> list[Any]:
    """Calls C{call} in the reactor without waiting; the list gets its outcome."""
    outcome: list[Any] = []
    reactor.callFromThread(
        lambda: call().addBoth(outcome.append).addErrback(lambda failure: None))
    return outcome


# TLS options: once per route, again on SIGHUP.

def test_upstream_ca_bundles_are_read_again_on_reload(reactor: Any, upstream: Upstream,
                                                      tmp_path: Any) -> None:
    bundle = write_ca_bundle(str(tmp_path / "ca.pem"))
    route = upstream.route(ca_certificates=bundle)
    connector = UpstreamConnector(reactor, "bridge.test")
    reloader = CertificateReloader(reactor, [], also=[connector.forget_tls])

    def connect() -> Any:
        return blockingCallFromThread(reactor, connector.connect, route, upstream.account())

    blockingCallFromThread(reactor, connect().quit)
    first = connector.tls_options(route)
    write_ca_bundle(bundle, trust_test_ca=False)  # the upstream's CA leaves the bundle
    blockingCallFromThread(reactor, connect().quit)  # built once: the old bundle holds
    assert connector.tls_options(route) is first
    assert reloader.reload()
    with pytest.raises(UpstreamError) as caught:
        connect()
    assert caught.value.reply.code == 454
    assert connector.tls_options(route) is not first


# The heap.

def test_the_start_up_heap_is_frozen() -> None:
    freezer = HeapFreezer()
    try:
        gc.unfreeze()
        freezer.startService()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_idle_client_sessions_give_their_tls_buffers_back(certificate: tuple[str, str]) -> None:
    from OpenSSL import SSL

    context = server_context(*certificate)
    assert context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS


def test_restarting_a_deadline_moves_it_without_a_timer_each_time() -> None:
    from smtpbridge.deadline import Deadline

    clock, fired = Clock(), []
    deadline = Deadline(clock, 10, lambda: fired.append(clock.seconds()))
    for _ in range(1000):  # a line each 0.01 s, as the idle deadline sees it
        deadline.start()
        clock.advance(0.01)
        assert len(clock.getDelayedCalls()) == 1
    clock.advance(9.98)
    assert fired == [] and deadline.running
    clock.advance(0.02)
    assert fired == [pytest.approx(20.0)] and not deadline.running
    deadline.start()
    deadline.stop()
    clock.advance(60)
    assert len(fired) == 1 and clock.getDelayedCalls() == []


def test_a_paused_deadline_keeps_its_timer_for_the_next_start() -> None:
    from smtpbridge.deadline import Deadline

    clock, fired = Clock(), []
    deadline = Deadline(clock, 10, lambda: fired.append(clock.seconds()))
    deadline.start()
    [timer] = clock.getDelayedCalls()
    for _ in range(100):  # a command relayed upstream: paused, then started again
        deadline.pause()
        assert not deadline.running
        clock.advance(0.05)
        deadline.start()
        assert clock.getDelayedCalls() == [timer] and deadline.running
    clock.advance(10)
    assert fired == [pytest.approx(15.0)]
    deadline.start()
    deadline.pause()
    clock.advance(30)  # paused past its time: it does not fire, and its timer is gone
    assert len(fired) == 1 and clock.getDelayedCalls() == [] and not deadline.running
    deadline.ensure()
    clock.advance(10)
    assert fired[1:] == [pytest.approx(55.0)]
    deadline.start()
    deadline.pause()
    deadline.stop()  # the session ended: no timer stays behind
    assert clock.getDelayedCalls() == []
