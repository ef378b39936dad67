"""Who may submit: trusted networks and the submission decision."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from zope.interface import implementer

from smtpbridge.errors import ConfigError
from smtpbridge.interfaces import IAccessPolicy
from smtpbridge.model import ClientInfo, Reply

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

REPLY_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")


def peer_address(host: object) -> Address | None:
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
        address = peer_address(host)
        if address is None:
            return False
        candidates: list[Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        return any(a in net for a in candidates for net in self.networks)

    def __repr__(self) -> str:
        return f"TrustedNetworks({[str(n) for n in self.networks]!r})"


def sender_matches(sender: str, patterns: Iterable[str]) -> bool:
    """True when C{sender} is one of the addresses or in one of the @domains (any case)."""
    address = sender.lower()
    domain = "@" + address.rpartition("@")[2]
    return any(p.lower() in (address, domain) for p in patterns)


class SenderRules:
    """Which envelope senders a local user, or a trusted network's clients, may use.

    A user or network without rules may use any sender; the null sender (bounces)
    is always allowed.  For clients without AUTH the most specific network counts.
    """

    def __init__(self, users: Mapping[str, Iterable[str]],
                 networks: Mapping[str, Iterable[str]]) -> None:
        self._users = {name: tuple(p) for name, p in users.items()}
        parsed = [(ipaddress.ip_network(n, strict=False), tuple(p)) for n, p in networks.items()]
        parsed.sort(key=lambda item: -item[0].prefixlen)
        self._networks = [(TrustedNetworks([net]), patterns) for net, patterns in parsed]

    def refusal(self, client: ClientInfo, sender: str) -> Reply | None:
        """None when C{client} may use C{sender}, else the 553 refusing it."""
        if sender == "":
            return None
        if client.login:
            patterns = self._users.get(client.login)
            who = f"user {client.login}"
        else:
            patterns = next((p for net, p in self._networks if client.peer_host in net), None)
            who = f"clients from [{client.peer_host}]"
        if patterns is None or sender_matches(sender, patterns):
            return None
        return Reply(553, "5.7.1", f"Sender address <{sender}> is not allowed for {who}")


@implementer(IAccessPolicy)
class AccessPolicy:
    """Authenticated clients may submit; trusted networks too where AUTH is optional;
    sender rules limit the envelope senders either may use."""

    def __init__(self, trusted: TrustedNetworks, senders: SenderRules | None = None) -> None:
        self._trusted = trusted
        self._senders = senders or SenderRules({}, {})

    def may_submit(self, client: ClientInfo, auth_required: bool) -> Reply | None:
        """None when C{client} may start a transaction, else the reply refusing it."""
        if client.login:
            return None
        if not auth_required and client.peer_host in self._trusted:
            return None
        return REPLY_AUTH_REQUIRED

    def may_send_as(self, client: ClientInfo, sender: str) -> Reply | None:
        """None when C{client} may use the envelope sender C{sender}, else the 553."""
        return self._senders.refusal(client, sender)
