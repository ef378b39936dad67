"""Who may submit: trusted networks and the submission decision."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from zope.interface import implementer

from smtpbridge.errors import ConfigError
from smtpbridge.interfaces import IAccessPolicy
from smtpbridge.model import ClientInfo, Reply

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

REPLY_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")


def _peer_address(host: object) -> Address | None:
    """The IP address in a peer host string as Twisted reports it, or None."""
    if not isinstance(host, str):
        return None
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.partition("%")[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class TrustedNetworks:
    """A set of IP networks whose clients may relay without AUTH."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks: tuple[Network, ...] = tuple(networks)

    @classmethod
    def parse(cls, values: Iterable[str], file: str, key: str) -> TrustedNetworks:
        """Build from configuration strings such as ``"192.168.1.0/24"`` or ``"::1"``."""
        networks: list[Network] = []
        for value in values:
            if not isinstance(value, str):
                raise ConfigError(file, key, f"{value!r} is not an IP network")
            try:
                networks.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise ConfigError(file, key, f"{value!r} is not an IP network")
        return cls(networks)

    def __contains__(self, host: object) -> bool:
        """True when the peer host string is an address inside one of the networks.

        An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, as a dual-stack
        listener reports IPv4 peers) also matches the IPv4 networks.
        """
        address = _peer_address(host)
        if address is None:
            return False
        candidates: list[Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        return any(a in net for a in candidates for net in self.networks)

    def __repr__(self) -> str:
        return f"TrustedNetworks({[str(n) for n in self.networks]!r})"


@implementer(IAccessPolicy)
class AccessPolicy:
    """Authenticated clients may submit; trusted networks too where AUTH is optional."""

    def __init__(self, trusted: TrustedNetworks) -> None:
        self._trusted = trusted

    def may_submit(self, client: ClientInfo, auth_required: bool) -> Reply | None:
        """None when C{client} may start a transaction, else the reply refusing it."""
        if client.login:
            return None
        if not auth_required and client.peer_host in self._trusted:
            return None
        return REPLY_AUTH_REQUIRED
