"""Logging in upstream: PLAIN or LOGIN with a password, XOAUTH2 or OAUTHBEARER with an
OAuth2 token (a refused token is dropped and the login tried once more).

It speaks through a L{LoginChannel}, the few calls of the upstream protocol it needs,
so the protocol and the login code do not import each other.
"""

from __future__ import annotations

from typing import Literal, Protocol

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from smtpbridge import sasl
from smtpbridge.errors import LoginRejected, SMTPReplyError, UpstreamError
from smtpbridge.interfaces import ITokenSource
from smtpbridge.model import Reply, Route, UpstreamAccount
from smtpbridge.replies import UpstreamFailure
from smtpbridge.wire import reply_line

log = Logger()

__all__ = ["Login", "LoginChannel", "authenticate", "refuse"]


@attr.frozen
class Login:
    """A login the upstream accepted: the mechanism, and the OAuth2 token it took."""

    mechanism: str
    token: str | None = attr.field(default=None, repr=False)


class LoginChannel(Protocol):
    """What logging in needs of an upstream connection."""

    route: Route
    secrets: tuple[str, ...]  # hidden in every error text

    @property
    def label(self) -> str: ...

    def send(self, command: str | bytes, step: str) -> Deferred[Reply]: ...

    def error_for(self, failure: UpstreamFailure, text: str) -> UpstreamError: ...

    def hide(self, text: str) -> str: ...

    def fail(self, error: SMTPReplyError, close: Literal["quit"]) -> None: ...


async def authenticate(channel: LoginChannel, account: UpstreamAccount,
                       features: dict[str, str], tokens: ITokenSource | None) -> Login:
    """Log in with the account's mechanism (or the best offered); the mechanism used, and
    the token of an OAuth2 login.  C{tokens} is the token source of an OAuth2 account."""
    offered = features.get("AUTH", "").upper().split()
    mechanism = sasl.choose_mechanism(offered, account.mechanism, account.oauth)
    if mechanism is None:
        kind = "OAuth2 " if account.oauth else ""
        raise refuse(channel, UpstreamFailure.SECURITY,
                     f"offers no {kind}AUTH mechanism the bridge can use (offered: "
                     f"{' '.join(offered) or 'none'})")
    token = None
    if account.oauth:
        if tokens is None:
            raise refuse(channel, UpstreamFailure.INTERNAL,
                         f"cannot log in {account.username}: the account has no token source")
        reply, token = await _oauth_login(channel, account, mechanism, tokens)
    else:
        reply = await _password_login(channel, account, mechanism)
    if reply.code >= 500:  # a verdict on the credentials
        error = refuse(channel, UpstreamFailure.SECURITY,
                       f"rejected the login of {account.username}: {reply_line(reply)}")
        raise LoginRejected(error.reply)
    if reply.code != 235:  # 454, 421...: a passing trouble, not the credentials
        raise refuse(channel, UpstreamFailure.SECURITY,
                     f"could not log in {account.username} now: {reply_line(reply)}")
    return Login(mechanism, token)


async def _password_login(channel: LoginChannel, account: UpstreamAccount,
                          mechanism: str) -> Reply:
    user = account.username
    password = account.password.value if account.password is not None else ""
    plain = sasl.plain_response(user, password)
    channel.secrets = tuple(s for s in (password, sasl.b64(password), plain) if s)
    if mechanism == "PLAIN":
        return await channel.send(f"AUTH PLAIN {plain}", "AUTH")
    reply = await channel.send("AUTH LOGIN", "AUTH")
    for answer in (user, password):
        if reply.code != 334:
            break
        reply = await channel.send(sasl.b64(answer), "AUTH")
    return reply


async def _oauth_login(channel: LoginChannel, account: UpstreamAccount, mechanism: str,
                       source: ITokenSource) -> tuple[Reply, str | None]:
    """XOAUTH2 or OAUTHBEARER with a fresh token; a rejected token is dropped and the
    login tried once more with a new one.  The last reply, and the token it answered."""
    reply = Reply(535, None, "no attempt")
    token: str | None = None
    for _attempt in range(2):
        try:
            token = await source.token()
        except SMTPReplyError as e:
            channel.fail(e, close="quit")
            raise
        if mechanism == "XOAUTH2":
            response = sasl.xoauth2_response(account.username, token)
        else:
            response = sasl.oauthbearer_response(account.username, token,
                                                 channel.route.host, channel.route.port)
        channel.secrets += (token, response)
        reply = await channel.send(f"AUTH {mechanism} {response}", "AUTH")
        if reply.code == 334:  # the server's error details; answering ends the exchange
            details = sasl.oauth_error(reply.text)
            ack = "" if mechanism == "XOAUTH2" else sasl.OAUTHBEARER_ERROR_ACK
            reply = await channel.send(ack, "AUTH")
            reply = attr.evolve(reply, text=f"{reply.text} ({details})")
        if reply.code < 500:  # 235, or a 4xx, which says nothing of the token
            return reply, token
        source.invalidate(token)
        log.info("upstream {where}: OAuth2 token for {user} refused ({text}); it is dropped",
                 where=channel.label, user=account.username,
                 text=channel.hide(reply_line(reply)))  # (an upstream may echo the token)
    return reply, token


def refuse(channel: LoginChannel, failure: UpstreamFailure, text: str) -> UpstreamError:
    """End the session politely for a reply-level failure; the error to raise."""
    error = channel.error_for(failure, text)
    channel.fail(error, close="quit")
    return error
