"""What a session logs, in memory.  The same lines from real clients are in
L{tests.test_loopback} and L{tests.test_devices}."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smtpbridge.demo import demo_upstream_factory
from smtpbridge.testing import MemoryDelivery
from smtpbridge.tls import ServerTLS
from tests.test_server import Session


def test_the_demo_upstreams_lines_are_labelled(logged):
    """The demo upstream's sessions log as smtpbridge.demo, each line saying so; the
    bridge's as smtpbridge.server."""
    factory = demo_upstream_factory(MemoryDelivery(), "demo", "pass", ServerTLS(None), Clock())
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1)))
    sid = protocol.client.session_id
    assert f"demo upstream {sid} connect from [127.0.0.1]:1 on listener demo-upstream" \
        in logged[0::3]
    assert any("'log_namespace': 'smtpbridge.demo'" in line and sid in line
               for line in logged[2::3])
    bridge = Session()
    assert bridge.protocol.log.namespace == "smtpbridge.server"
    assert f"{bridge.protocol.client.session_id} connect from [127.0.0.1]:40000 on listener " \
           "test" in logged[0::3]
