"""Client addresses and IP networks: one reading of a peer host string for every rule.

Twisted reports a peer as a host string: ``192.0.2.1``, ``::1``, an IPv4 address
mapped into IPv6 by a dual-stack listener (``::ffff:192.0.2.1``), an IPv6 address
with a zone (``fe80::1%eth0``), or something that is no address at all (a UNIX
socket path).  Trusted networks, sender rules, the per-device mapper, the AUTH
throttle, connection limits and the ``Received:`` header all read it here, the same
way.  The kind of a listener's endpoint string is read here too (L{endpoint_kind}).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

T = TypeVar("T")


def parse_address(host: object) -> Address | None:
    """The IP address in a peer host string (brackets and an IPv6 zone dropped), or None."""
    if not isinstance(host, str):
        return None
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.partition("%")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address as the IPv4 address it stands for; others unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalise_address(host: str) -> str:
    """The canonical spelling of a peer host string, so one client has one key everywhere.

    An IPv4-mapped IPv6 address counts as its IPv4 address; a string that is not an IP
    address is used as it is.
    """
    address = parse_address(host)
    return host if address is None else str(unmapped(address))


def address_literal(host: str) -> str | None:
    """The peer as an RFC 5321 address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``),
    an IPv4-mapped address as IPv4; None when the host string is no IP address."""
    address = parse_address(host)
    if address is None:
        return None
    address = unmapped(address)
    if isinstance(address, ipaddress.IPv6Address):
        return f"[IPv6:{address}]"
    return f"[{address}]"


def parse_network(value: object) -> Network:
    """A network from configuration (``"192.168.1.0/24"``, ``"::1"``; host bits are
    ignored); ValueError ``'<value>' is not an IP network``."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not an IP network")


def _candidates(host: object) -> tuple[Address, ...]:
    """The addresses a host string may match: itself, and its IPv4 form if it is mapped."""
    address = parse_address(host)
    if address is None:
        return ()
    plain = unmapped(address)
    return (address,) if plain == address else (address, plain)


class NetworkSet:
    """A set of IP networks; ``host in networks`` for a peer host string."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks: tuple[Network, ...] = tuple(networks)

    @classmethod
    def parse(cls, values: Iterable[object]) -> NetworkSet:
        """From configuration strings; ValueError naming the first that is no network."""
        return cls(parse_network(value) for value in values)

    def __contains__(self, host: object) -> bool:
        """True when the peer host string is an address inside one of the networks.

        An IPv4-mapped IPv6 address also matches the IPv4 networks.
        """
        return any(a in net for a in _candidates(host) for net in self.networks)

    def __repr__(self) -> str:
        return f"NetworkSet({[str(n) for n in self.networks]!r})"


class NetworkTable(Generic[T]):
    """Values by network; a lookup finds the most specific network holding the peer."""

    def __init__(self, entries: Iterable[tuple[Network, T]]) -> None:
        self._entries = sorted(entries, key=lambda item: -item[0].prefixlen)

    def lookup(self, host: object) -> T | None:
        """The value of the most specific network that holds C{host}, or None."""
        candidates = _candidates(host)
        for network, value in self._entries:
            if any(a in network for a in candidates):
                return value
        return None

    def __iter__(self) -> Iterator[tuple[Network, T]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def endpoint_kind(description: str) -> str:
    """The kind of a listener's endpoint string (``tcp``, ``tcp6``, ``unix``,
    ``systemd``, ...), under its ``haproxy:`` prefix if it has one."""
    return description.removeprefix("haproxy:").partition(":")[0]
