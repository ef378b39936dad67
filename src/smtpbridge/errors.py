"""Exceptions of the bridge; protocol errors carry the SMTP reply to give."""

from __future__ import annotations

from smtpbridge.model import Reply


class SMTPReplyError(Exception):
    """A failure that has a ready SMTP reply for the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced or ''} {reply.text}".replace("  ", " "))
        self.reply = reply


class UpstreamError(SMTPReplyError):
    """The upstream session failed (unreachable, TLS, timeout, lost, refused); the reply is a
    4xx naming the upstream and the step."""


class Unreachable(UpstreamError):
    """No connection to the upstream could be made (refused, no route, no such name,
    timed out while connecting)."""


class LoginRejected(UpstreamError):
    """The upstream refused the account's credentials (not a connection or TLS problem)."""


class TokenError(SMTPReplyError):
    """No OAuth2 access token could be obtained: 454 4.7.0 with the reason (never a secret)."""

    def __init__(self, text: str) -> None:
        super().__init__(Reply(454, "4.7.0", text))


class OptionError(ValueError):
    """A credential mapper's option is wrong: the key (within ``[credentials]``) and why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class ConfigError(Exception):
    """A configuration problem, reported as one line: file, key and reason."""

    def __init__(self, file: str, key: str | None, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")
