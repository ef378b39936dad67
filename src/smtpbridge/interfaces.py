"""Every interface between the stages of the bridge.

The data flows one way: listener -> session (ITransaction of an IDelivery) ->
IAccessPolicy -> ICredentialMapper -> IDelivery -> IUpstreamConnector ->
IUpstreamSession.  Each stage knows only the interface of the stage after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import Attribute, Interface

from smtpbridge.model import Assignment, ClientInfo, Reply, Route, UpstreamAccount

#: ESMTP parameters of MAIL or RCPT: upper-case keyword -> value (None: a bare keyword).
Params = Mapping[str, str | None]


class ITransaction(Interface):
    """One mail transaction, driven by the downstream session command by command.

    Each step returns a Deferred that fires with the L{Reply} to give the client
    (positive or not) or fails with L{smtpbridge.errors.SMTPReplyError}.  Once
    ``finish`` fired or ``abort`` was called, the transaction is over.
    """

    def mail(sender: str, params: Params) -> Deferred[Reply]:
        """MAIL FROM: start the transaction for C{sender}."""

    def rcpt(recipient: str, params: Params) -> Deferred[Reply]:
        """RCPT TO: add one recipient."""

    def data(producer: IPushProducer) -> Deferred[Reply]:
        """DATA: fires with 354 when the body may follow.

        C{producer} is the client's side; it is paused while the body cannot be
        taken fast enough.
        """

    def write(lines: Sequence[bytes]) -> None:
        """Body lines, unstuffed and without line endings."""

    def finish() -> Deferred[Reply]:
        """The final dot: fires with the reply that says whether the message was taken."""

    def abort() -> None:
        """Give up: nothing of this transaction may be delivered."""


class IReportingTransaction(ITransaction):
    """A transaction that says how its message ended, for the summary line and metrics.

    ``outcome`` is a L{smtpbridge.model.MessageOutcome} once a step gave the delivery's
    verdict (the final dot, or a refusal at MAIL or DATA), None before.  The session
    reads it when it answers that step.
    """

    outcome = Attribute("The MessageOutcome of the transaction, or None.")


class IStatistics(Interface):
    """Hears what the bridge does, for its metrics.  Every method returns at once and
    never fails; none is given a secret."""

    def message(summary: Any) -> None:
        """One message ended: its L{smtpbridge.summary.MessageSummary}."""

    def tls(listener: str, version: str, cipher: str) -> None:
        """A client's TLS handshake completed on C{listener}."""

    def auth(listener: str, result: str) -> None:
        """An AUTH attempt on C{listener} ended: ok, failed, blocked, busy, rate or error."""

    def token(account: str, ok: bool) -> None:
        """An OAuth2 token was fetched for C{account}, or the fetch failed."""

    def rate_limited(limit: str) -> None:
        """A MAIL or RCPT was refused by the rate limit named C{limit}."""


class IDelivery(Interface):
    """Where messages go: the demo folder, the upstream in-line, or the spool."""

    def transaction(client: ClientInfo) -> ITransaction:
        """A new transaction for the client."""


class IPasswordChecker(Interface):
    """Checks a local user's password."""

    def check(username: str, password: str) -> Deferred[bool]:
        """A Deferred that fires with True or False."""


class IVerifiedLogins(Interface):
    """A password checker that remembers logins it verified a short while ago."""

    def remembers(username: str, password: str) -> bool:
        """True when C{password} is the one verified for C{username} within the cache's
        time: the check will be answered at once, without the costly hash."""


class IAccessPolicy(Interface):
    """Decides who may submit mail."""

    def may_submit(client: ClientInfo, auth_required: bool) -> Reply | None:
        """None when the client may start a transaction, else the refusing Reply."""

    def may_send_as(client: ClientInfo, sender: str) -> Reply | None:
        """None when the client may use this envelope sender, else the refusing Reply."""


class ICredentialMapper(Interface):
    """Chooses, per transaction, the upstream route and account."""

    def map(client: ClientInfo, sender: str) -> Assignment | Deferred[Assignment]:
        """The routes and account for the client and envelope sender; fails with
        L{smtpbridge.errors.SMTPReplyError} when no account may serve them."""


class IClientLoginMapper(ICredentialMapper):
    """A mapper that uses the client's own AUTH login upstream (passthrough).

    The bridge then checks local logins by logging in upstream on C{routes}, and keeps
    the client's password (in memory, for the session) to log in with it.
    """

    routes = Attribute("The tuple of Routes the clients' logins are checked and used on.")


class ICredentialMapperFactory(Interface):
    """A credential mapper by name: the built-in ones, and third-party Twisted plugins.

    A plugin is a module in a ``twisted/plugins/`` directory on the Python path that
    provides an object with C{IPlugin} and this interface; ``[credentials] mapper =
    "<name>"`` selects it.
    """

    name = Attribute("The name that [credentials] mapper = ... uses.")

    def make(options: Mapping[str, Any], accounts: Mapping[str, Assignment],
             reactor: Any) -> ICredentialMapper:
        """Build the mapper from its options (the keys of ``[credentials]`` besides
        ``mapper``, and those of ``[credentials.options]``) and the configured accounts
        by name; raise C{ValueError} with a clear reason for a bad option
        (L{smtpbridge.errors.OptionError} to name the key)."""


class ITokenSource(Interface):
    """OAuth2 access tokens for one upstream account."""

    def token() -> Deferred[str]:
        """A valid access token: the cached one while it is fresh, else a new one
        (concurrent callers share one request).  Fails with
        L{smtpbridge.errors.TokenError} (454 4.7.0 naming the token endpoint's error)."""

    def invalidate(token: str) -> None:
        """The upstream rejected C{token}: the next L{token} call fetches a new one."""

    def expires_at(token: str) -> float | None:
        """When C{token} (one this source gave) expires, in seconds of the source's clock;
        None when the source no longer holds it (it was replaced or refused)."""


class IUpstreamSession(Interface):
    """One upstream SMTP session: connected, TLS verified, logged in, ready for MAIL FROM.

    The upstream's replies to MAIL, RCPT, DATA, the final dot and RSET pass through as
    they are, positive or not.  When the session itself fails (lost, timed out, broke
    the protocol), the pending and every later Deferred fail with
    L{smtpbridge.errors.UpstreamError}, whose 4xx reply names the upstream and the step.
    """

    route = Attribute("The Route this session is connected to.")
    features = Attribute("The upstream's EHLO keywords (upper-case) and their parameters.")
    usable = Attribute("True while connected, in no failure and with no command pending.")
    valid_until = Attribute("When the session's login stops being good, in seconds of the "
                            "reactor's clock (an OAuth2 token's expiry); None: never.")

    def mail(sender: str, params: Params) -> Deferred[Reply]:
        """MAIL FROM, passing on only the parameters the upstream advertised."""

    def rcpt(recipient: str, params: Params) -> Deferred[Reply]:
        """RCPT TO."""

    def data(producer: IPushProducer) -> Deferred[Reply]:
        """DATA: fires with the upstream's 354 or its refusal (4xx, 5xx); any other
        answer breaks the session (an L{UpstreamError}, as if it were lost).  On 354,
        C{producer} (the client's side) is paused whenever the upstream cannot take the
        body as fast as it comes."""

    def write_lines(lines: Sequence[bytes]) -> None:
        """Body lines, unstuffed and without line endings; sent dot-stuffed with CRLF."""

    def end_data() -> Deferred[Reply]:
        """The final dot: fires with the upstream's verdict on the message."""

    def reset() -> Deferred[Reply]:
        """RSET: forget the transaction under way (not during DATA)."""

    def quit() -> Deferred[None]:
        """The session is no longer needed: QUIT and close.  Never fails."""

    def abort() -> None:
        """Drop the connection at once: a message in DATA is never finished upstream."""


class IUpstreamConnector(Interface):
    """Opens upstream sessions."""

    def connect(route: Route, account: UpstreamAccount | None) -> Deferred[IUpstreamSession]:
        """A session on C{route}, logged in with C{account} (None: no AUTH); fails with
        L{smtpbridge.errors.UpstreamError} (L{smtpbridge.errors.LoginRejected} when the
        login was refused) or L{smtpbridge.errors.TokenError}."""
