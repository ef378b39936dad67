"""The replies the bridge gives its clients, by name (RFC 5321, 3463, 4954)."""

from __future__ import annotations

import enum

from smtpbridge.model import Reply

OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage; try again later")
QUEUE_FAILED = Reply(451, "4.3.0", "Message could not be queued; try again later")
BYE = Reply(221, "2.0.0", "Bye")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
VRFY_REPLY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP_REPLY = Reply(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET "
                                 "NOOP QUIT VRFY HELP")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMP_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_BLOCKED = Reply(454, "4.7.0", "Too many failed logins from your address; try again later")
AUTH_BUSY = Reply(454, "4.7.0", "Too many logins at once; try again later")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_UNDECODABLE = Reply(501, "5.5.2", "Cannot decode AUTH response")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication "
                                      "mechanism; use STARTTLS first")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
NOT_RECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4", "Bad BODY parameter; 7BIT or 8BITMIME")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs MAIL FROM with SMTPUTF8")
UPSTREAM_NO_SMTPUTF8 = Reply(553, "5.6.7", "The upstream does not support SMTPUTF8; "
                                           "non-ASCII addresses and headers cannot be relayed")
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later")


def syntax(usage: str) -> Reply:
    """501: the command's arguments do not parse."""
    return Reply(501, "5.5.4", f"Syntax: {usage}")


def unsupported(name: str) -> Reply:
    """555: an ESMTP parameter the bridge does not know (RFC 5321 4.1.1.11)."""
    return Reply(555, "5.5.4", f"Unsupported option: {name}")


class UpstreamFailure(enum.Enum):
    """What went wrong upstream, and the reply code that says so to the client.

    Every one is temporary (4xx): the client may try again later.
    """

    UNREACHABLE = (451, "4.4.1")  # no connection: refused, no route, name not found
    LOST = (451, "4.4.2")  # timed out, or the connection was closed mid-session
    PROTOCOL = (451, "4.5.0")  # the upstream broke the protocol (malformed, over-long)
    REFUSED = (451, "4.3.2")  # the upstream refused the session (greeting, EHLO)
    SECURITY = (454, "4.7.0")  # no STARTTLS, no usable AUTH mechanism, login rejected
    TLS = (454, "4.7.5")  # TLS handshake, certificate or pin failed
    INTERNAL = (451, "4.3.0")  # a bug of the bridge while setting the session up

    def reply(self, where: str, text: str) -> Reply:
        """The reply to give: ``Upstream <where> <text>``."""
        code, enhanced = self.value
        return Reply(code, enhanced, f"Upstream {where} {text}")
