"""Logging in upstream: PLAIN or LOGIN with a password, XOAUTH2 or OAUTHBEARER with an
OAuth2 token (a refused token is dropped and the login tried once more)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attr
from twisted.logger import Logger

from smtpbridge import sasl
from smtpbridge.errors import SMTPReplyError
from smtpbridge.model import Reply, UpstreamAccount
from smtpbridge.wire import reply_line

if TYPE_CHECKING:
    from smtpbridge.client import UpstreamProtocol

log = Logger()

__all__ = ["LoginRejected", "authenticate", "refuse"]


class LoginRejected(SMTPReplyError):
    """The upstream refused the account's credentials (not a connection or TLS problem)."""


def _password(account: UpstreamAccount) -> str:
    return str(getattr(account.password, "value", account.password))


async def authenticate(protocol: UpstreamProtocol, account: UpstreamAccount,
                        features: dict[str, str]) -> str:
    """Log in with the account's mechanism (or the best offered); the mechanism used."""
    offered = features.get("AUTH", "").upper().split()
    oauth = account.token_source is not None
    mechanism = sasl.choose_mechanism(offered, account.mechanism, oauth)
    if mechanism is None:
        kind = "OAuth2 " if oauth else ""
        raise refuse(protocol, 454, "4.7.0", f"offers no {kind}AUTH mechanism the bridge can "
                                             f"use (offered: {' '.join(offered) or 'none'})")
    if oauth:
        reply = await _oauth_login(protocol, account, mechanism)
    else:
        reply = await _password_login(protocol, account, mechanism)
    if reply.code != 235:
        error = refuse(protocol, 454, "4.7.0", f"rejected the login of {account.username}: "
                                               f"{reply_line(reply)}")
        raise LoginRejected(error.reply)
    return mechanism


async def _password_login(protocol: UpstreamProtocol, account: UpstreamAccount,
                          mechanism: str) -> Reply:
    user, password = account.username, _password(account)
    plain = sasl.plain_response(user, password)
    protocol.secrets = tuple(s for s in (password, sasl.b64(password), plain) if s)
    if mechanism == "PLAIN":
        return await protocol.send(f"AUTH PLAIN {plain}", "AUTH")
    reply = await protocol.send("AUTH LOGIN", "AUTH")
    for answer in (user, password):
        if reply.code != 334:
            break
        reply = await protocol.send(sasl.b64(answer), "AUTH")
    return reply


async def _oauth_login(protocol: UpstreamProtocol, account: UpstreamAccount,
                       mechanism: str) -> Reply:
    """XOAUTH2 or OAUTHBEARER with a fresh token; a rejected token is dropped and the
    login tried once more with a new one."""
    source = account.token_source
    reply = Reply(535, None, "no attempt")
    for _attempt in range(2):
        try:
            token = await source.token()
        except SMTPReplyError as e:
            protocol.fail(e, close="quit")
            raise
        if mechanism == "XOAUTH2":
            response = sasl.xoauth2_response(account.username, token)
        else:
            response = sasl.oauthbearer_response(account.username, token,
                                                 protocol.route.host, protocol.route.port)
        protocol.secrets += (token, response)
        reply = await protocol.send(f"AUTH {mechanism} {response}", "AUTH")
        if reply.code == 334:  # the server's error details; answering ends the exchange
            details = sasl.oauth_error(reply.text)
            ack = "" if mechanism == "XOAUTH2" else sasl.OAUTHBEARER_ERROR_ACK
            reply = await protocol.send(ack, "AUTH")
            reply = attr.evolve(reply, text=f"{reply.text} ({details})")
        if reply.code == 235:
            return reply
        source.invalidate(token)
        log.info("upstream {where}: OAuth2 token for {user} refused ({text}); it is dropped",
                 where=protocol.label, user=account.username, text=reply_line(reply))
    return reply


def refuse(protocol: UpstreamProtocol, code: int, enhanced: str, text: str) -> SMTPReplyError:
    """End the session politely for a reply-level failure; the error to raise."""
    error = protocol.error_for(code, enhanced, text)
    protocol.fail(error, close="quit")
    return error
