"""What the bridge changes and checks in a message body on its way upstream: the From:
rewrite to the account's address, and (when the upstream lacks SMTPUTF8) that the
header section is ASCII.  Lines as the DATA codec hands them over: unstuffed, without
line endings."""

from __future__ import annotations

from collections.abc import Sequence

from smtpbridge.errors import SMTPReplyError
from smtpbridge.replies import UPSTREAM_NO_SMTPUTF8
from smtpbridge.rewrite import SenderRewriter


class BodyFilter:
    """Feed it the body as it comes; it returns the lines to send on, or raises the
    L{SMTPReplyError} that refuses the message (a header section too large to rewrite,
    552 5.3.4; a non-ASCII header without SMTPUTF8 upstream, 553 5.6.7)."""

    def __init__(self, rewrite_to: str | None = None, ascii_headers: bool = False) -> None:
        self._rewriter = SenderRewriter(rewrite_to) if rewrite_to else None
        self.ascii_headers = ascii_headers
        self._in_header = True

    def feed(self, lines: Sequence[bytes]) -> Sequence[bytes]:
        if self.ascii_headers and self._in_header:
            for line in lines:
                if not line:
                    self._in_header = False
                    break
                if not line.isascii():
                    raise SMTPReplyError(UPSTREAM_NO_SMTPUTF8)
        if self._rewriter is not None:
            return self._rewriter.feed(list(lines))
        return lines

    def close(self) -> list[bytes]:
        """The end of the message: what is still held (a message that is all header)."""
        return self._rewriter.close() if self._rewriter is not None else []
