"""The PROXY header in memory: the session starts only once it is read, in pieces or
whole, v1 or v2; anything else, or nothing in time, drops the connection."""

from __future__ import annotations

import socket
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smtpbridge.proxyheader import ProxyHeaderFactory


class Recorder(Protocol):
    peer: object = None

    def __init__(self) -> None:
        self.data = b""

    def connectionMade(self) -> None:  # noqa: N802
        self.peer = self.transport.getPeer()
        self.transport.write(b"220 greeting\r\n")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data


class Transport(StringTransport):
    aborted = False

    def abortConnection(self) -> None:  # noqa: N802
        self.aborted = True


def connect() -> tuple[object, Transport, Clock, list[Recorder]]:
    clock, built = Clock(), []

    def build() -> Recorder:
        built.append(Recorder())
        return built[-1]

    factory = ProxyHeaderFactory(Factory.forProtocol(build), clock, 5)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.3", 5000))
    transport = Transport(peerAddress=IPv4Address("TCP", "127.0.0.3", 5000))
    protocol.makeConnection(transport)
    return protocol, transport, clock, built


def v2_header(source: str, port: int) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack(
        "!HH", port, 2525)
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses))
            + addresses)


def test_v2_in_pieces_then_the_session() -> None:
    protocol, transport, _, built = connect()
    header = v2_header("192.0.2.9", 40000)
    for byte in header[:20]:
        protocol.dataReceived(bytes([byte]))
    assert built[0].peer is None and transport.value() == b""  # not a word before the header
    protocol.dataReceived(header[20:] + b"EHLO x\r\n")
    assert (built[0].peer.host, built[0].peer.port) == ("192.0.2.9", 40000)
    assert built[0].data == b"EHLO x\r\n"
    assert transport.value() == b"220 greeting\r\n"


def test_v1_header() -> None:
    protocol, _, _, built = connect()
    protocol.dataReceived(b"PROXY TCP4 198.51.100.4 127.0.0.1 51000 465\r\n")
    assert built[0].peer.host == "198.51.100.4"


def test_no_header_drops_at_once() -> None:
    protocol, transport, _, built = connect()
    protocol.dataReceived(b"EHLO direct.example\r\n")
    assert transport.aborted and built[0].peer is None and transport.value() == b""


def test_silence_drops_in_time() -> None:
    _, transport, clock, built = connect()
    clock.advance(4.9)
    assert not transport.aborted
    clock.advance(0.2)
    assert transport.aborted and built[0].peer is None
