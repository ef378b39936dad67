"""Exceptions of the bridge; protocol errors carry the SMTP reply to give."""

from __future__ import annotations

from smtpbridge.model import Reply


class SMTPReplyError(Exception):
    """A failure that has a ready SMTP reply for the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced or ''} {reply.text}".replace("  ", " "))
        self.reply = reply


class ConfigError(Exception):
    """A configuration problem, reported as one line: file, key and reason."""

    def __init__(self, file: str, key: str | None, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")
