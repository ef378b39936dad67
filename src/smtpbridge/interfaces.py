"""Every interface between the stages of the bridge."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ITransaction(Interface):
    """One mail transaction, driven by the downstream session command by command.

    Each step returns a Deferred that fires with the L{smtpbridge.model.Reply}
    to give the client (positive or not) or fails with
    L{smtpbridge.errors.SMTPReplyError}.  Once ``finish`` fired or ``abort``
    was called, the transaction is over.
    """

    def mail(sender: str, params: dict) -> object:
        """MAIL FROM: start the transaction for C{sender}."""

    def rcpt(recipient: str, params: dict) -> object:
        """RCPT TO: add one recipient."""

    def data(producer: object) -> object:
        """DATA: fires with 354 when the body may follow.

        C{producer} is an L{twisted.internet.interfaces.IPushProducer} for the
        client's side; it is paused while the body cannot be taken fast enough.
        """

    def write(lines: list) -> None:
        """Body lines, unstuffed and without line endings."""

    def finish() -> object:
        """The final dot: fires with the reply that says whether the message was taken."""

    def abort() -> None:
        """Give up: nothing of this transaction may be delivered."""


class ITokenSource(Interface):
    """OAuth2 access tokens for one upstream account."""

    def token() -> object:
        """A Deferred firing with a valid access token (str): the cached one while it is
        fresh, else a new one (concurrent callers share one request).  Fails with
        L{smtpbridge.errors.SMTPReplyError} (454 4.7.0 naming the token endpoint's error)."""

    def invalidate(token: str) -> None:
        """The upstream rejected C{token}: the next L{token} call fetches a new one."""


class IDelivery(Interface):
    """Where messages go: the demo folder, the upstream in-line, or the spool."""

    def transaction(client: object) -> ITransaction:
        """A new transaction for the client described by a L{smtpbridge.model.ClientInfo}."""


class IPasswordChecker(Interface):
    """Checks a local user's password."""

    def check(username: str, password: str) -> object:
        """A Deferred that fires with True or False."""


class IAccessPolicy(Interface):
    """Decides who may submit mail."""

    def may_submit(client: object, auth_required: bool) -> object:
        """None when the client may start a transaction, else the refusing Reply."""

    def may_send_as(client: object, sender: str) -> object:
        """None when the client may use this envelope sender, else the refusing Reply."""



class ICredentialMapper(Interface):
    """Chooses, per transaction, the upstream route and account."""

    def map(client: object, sender: str) -> object:
        """An L{smtpbridge.model.Assignment} (or a Deferred firing with one) for the
        client (a L{smtpbridge.model.ClientInfo}) and envelope sender; fails with
        L{smtpbridge.errors.SMTPReplyError} when no account may serve them."""


class ICredentialMapperFactory(Interface):
    """A third-party credential mapper, offered as a Twisted plugin.

    Put a module in a ``twisted/plugins/`` directory on the Python path that
    provides an object with C{IPlugin} and this interface; ``[credentials]
    mapper = "<name>"`` selects it and ``[credentials.options]`` is its table.
    """

    name = Attribute("The name that [credentials] mapper = ... uses.")

    def make(options: dict, accounts: dict, reactor: object) -> ICredentialMapper:
        """Build the mapper from its options table and the configured accounts
        (account name -> L{smtpbridge.model.Assignment}); raise C{ValueError}
        with a clear reason for a bad option."""
