"""Who may submit: trusted networks and the submission decision."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from zope.interface import implementer

from smtpbridge.interfaces import IAccessPolicy
from smtpbridge.model import ClientInfo, Reply
from smtpbridge.networks import Network, NetworkSet, NetworkTable

REPLY_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")


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
                 networks: Iterable[tuple[Network, Iterable[str]]]) -> None:
        self._users = {name: tuple(p) for name, p in users.items()}
        self._networks = NetworkTable((net, tuple(p)) for net, p in networks)

    def refusal(self, client: ClientInfo, sender: str) -> Reply | None:
        """None when C{client} may use C{sender}, else the 553 refusing it."""
        if sender == "":
            return None
        if client.login:
            patterns = self._users.get(client.login)
            who = f"user {client.login}"
        else:
            patterns = self._networks.lookup(client.peer_host)
            who = f"clients from [{client.peer_host}]"
        if patterns is None or sender_matches(sender, patterns):
            return None
        return Reply(553, "5.7.1", f"Sender address <{sender}> is not allowed for {who}")


@implementer(IAccessPolicy)
class AccessPolicy:
    """Authenticated clients may submit; trusted networks too where AUTH is optional;
    sender rules limit the envelope senders either may use."""

    def __init__(self, trusted: NetworkSet, senders: SenderRules | None = None) -> None:
        self.trusted = trusted
        self._senders = senders or SenderRules({}, ())

    def may_submit(self, client: ClientInfo, auth_required: bool) -> Reply | None:
        """None when C{client} may start a transaction, else the reply refusing it."""
        if client.login:
            return None
        if not auth_required and client.peer_host in self.trusted:
            return None
        return REPLY_AUTH_REQUIRED

    def may_send_as(self, client: ClientInfo, sender: str) -> Reply | None:
        """None when C{client} may use the envelope sender C{sender}, else the 553."""
        return self._senders.refusal(client, sender)
