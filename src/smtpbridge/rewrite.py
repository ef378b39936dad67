"""The rewrite of ``From:`` to the upstream account's address, done while the message
streams on its way upstream (body lines as the DATA codec hands them over: unstuffed,
without line endings), so that only its header section is ever held in memory.
"""

from __future__ import annotations

import re

from smtpbridge.errors import SMTPReplyError
from smtpbridge.model import Reply

MAX_LINE = 998  # RFC 5322 2.1.1: lines must not be longer than this


class HeaderTooLarge(SMTPReplyError):
    """The header section is too large for the From: rewrite: the message is refused."""

    def __init__(self, limit: int) -> None:
        super().__init__(Reply(552, "5.3.4", "Message header section exceeds "
                                             f"{limit // 1024} KiB; cannot rewrite the sender"))


# A header field's first line: a name of printable ASCII but ":", then ":"
# (blanks before the colon are the obsolete syntax of RFC 5322 4.5.3).
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
_CONTINUATION = (b" "[0], b"\t"[0])
_ADDRESS_UNSAFE = re.compile(r"[\x00-\x20\x7f<>()]")


class SenderRewriter:
    """Rewrites the From: header to the upstream account's address while the message streams,
    keeping the original From: as Reply-To: (unless the message already has a Reply-To:).

    Only the header section is held and changed; once it ends, body lines pass
    through at once and unchanged.  In detail, as a mail administrator expects:

    - ``From: Name <old@x>`` keeps its display name, comments and folding and
      only the address in its angle brackets changes; a bare ``From: old@x``,
      a From: naming several mailboxes, or one whose angle brackets are only
      inside a comment or quoted string, becomes ``From: new@y``.
    - ``Reply-To:`` with the original From: value, verbatim and folded as it
      was, goes right after the first From:, unless the message already has a
      Reply-To:, the From: already named the account's address, or was empty.
    - Every From: header is rewritten (a message with several is malformed, but
      none may keep a foreign address); Reply-To: takes the first one's value.
    - A message without From: gets ``From: <new@y>`` at the end of its header
      section.  A message without a header section (it starts with an empty
      line or a line that is not ``Name: value``) gets that From: and an empty
      line before its first line; a line that is not a header in the middle of
      the header section ends it the same way.  Postfix's cleanup does the
      same, and so does every parser: what follows is body, not header.
    - A header section over ``max_header_bytes`` (counting CRLFs) is not a
      device's, and a From: after that point could not be rewritten: the message is
      refused (L{HeaderTooLarge}, 552 5.3.4).  It never passes with its own From:.

    Lines stay within RFC 5322's 998 octets: a line the rewrite would make
    longer is folded at one of its blanks.
    """

    def __init__(self, address: str, max_header_bytes: int = 256 * 1024) -> None:
        if "@" not in address or _ADDRESS_UNSAFE.search(address):
            raise ValueError(f"not a usable From: address: {address!r}")
        self._address = address.encode("utf-8")
        self._limit = max_header_bytes
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._state = "header"  # header | body | closed

    def feed(self, lines: list[bytes]) -> list[bytes]:
        """Take the next body lines; return the lines ready to go upstream.

        While the header section lasts nothing is returned; the batch that ends
        it returns the rewritten header section and the rest of the batch; after
        that each batch is returned as it came (the same list).
        """
        if self._state == "body":
            return lines
        if self._state == "closed":
            raise RuntimeError("SenderRewriter fed after close")
        for index, line in enumerate(lines):
            if not line:
                out = self._rewritten()
                out.extend(lines[index:])
                return out
            if not (line[0] in _CONTINUATION and self._held) and not _FIELD.match(line):
                out = self._rewritten()
                out.append(b"")
                out.extend(lines[index:])
                return out
            self._held_bytes += len(line) + 2
            if self._held_bytes > self._limit:
                self._held, self._state = [], "closed"
                raise HeaderTooLarge(self._limit)
            self._held.append(line)
        return []

    def close(self) -> list[bytes]:
        """End of message: the header section still held (a message without a body), rewritten."""
        if self._state == "header":
            out = self._rewritten()
        else:
            out = []
        self._state = "closed"
        return out

    def _release(self) -> list[bytes]:
        """Stop holding: the held lines, from now on the body state."""
        out, self._held = self._held, []
        self._state = "body"
        return out

    def _rewritten(self) -> list[bytes]:
        """The held header section with From: rewritten and Reply-To: added; the body state."""
        fields = _fields(self._release())
        names = [_field_name(field) for field in fields]
        out: list[bytes] = []
        first = True
        for field, name in zip(fields, names, strict=True):
            if name != b"from":
                out.extend(field)
                continue
            rewritten, original = _rewrite_from(field, self._address)
            out.extend(rewritten)
            if first and b"reply-to" not in names and original.lower() != self._address.lower():
                out.extend(_reply_to(field))
            first = False
        if first:
            out.append(b"From: <" + self._address + b">")
        return out


def rewrite_headers(lines: list[bytes], address: str) -> list[bytes]:
    """A whole message through a `SenderRewriter` at once: for tests and small messages."""
    rewriter = SenderRewriter(address)
    out = rewriter.feed(list(lines))
    return out + rewriter.close()


def _fields(lines: list[bytes]) -> list[list[bytes]]:
    """The header section's lines grouped by field: each first line with its continuations."""
    fields: list[list[bytes]] = []
    for line in lines:
        if line[0] in _CONTINUATION:
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def _field_name(field: list[bytes]) -> bytes:
    """A field's name, lower-cased."""
    return field[0].partition(b":")[0].rstrip(b" \t").lower()


def _rewrite_from(field: list[bytes], address: bytes) -> tuple[list[bytes], bytes]:
    """A From: field with ``address`` in it, and the address it held (b"" if none or several)."""
    name, _, first = field[0].partition(b":")
    value = b"\n".join([first, *field[1:]])
    angles, outside = _scan(value)
    if len(angles) == 1 and b"@" not in outside:
        start, end = angles[0]
        lines = (value[:start] + address + value[end:]).split(b"\n")
        lines[0] = name + b":" + lines[0]
        original = value[start:end].strip()
    else:
        lines = [name + b": " + address]
        original = outside.strip() if not angles else b""
    return _fit(lines), original


def _reply_to(field: list[bytes]) -> list[bytes]:
    """A Reply-To: field with the value of a From: field, unless that value is empty."""
    first = field[0].partition(b":")[2]
    if not (first + b"".join(field[1:])).strip(b" \t"):
        return []
    return _fit([b"Reply-To:" + first, *field[1:]])


def _scan(value: bytes) -> tuple[list[tuple[int, int]], bytes]:
    """Where the angle addresses of a header value are, and its text outside them.

    Quoted strings and comments (nested, with backslash escapes) are skipped:
    brackets in them are no address.  Returns the (start, end) of each angle
    address's content and the bytes outside quotes, comments and angles.
    """
    angles: list[tuple[int, int]] = []
    outside = bytearray()
    depth = 0
    quoted = False
    opened = -1
    index = 0
    while index < len(value):
        char = value[index : index + 1]
        if char == b"\\" and (quoted or depth):
            index += 2
            continue
        if quoted:
            quoted = char != b'"'
        elif depth:
            depth += {b"(": 1, b")": -1}.get(char, 0)
        elif char == b'"':
            quoted = True
        elif char == b"(":
            depth = 1
        elif opened >= 0:
            if char == b">":
                angles.append((opened, index))
                opened = -1
        elif char == b"<":
            opened = index + 1
        else:
            outside += char
        index += 1
    return angles, bytes(outside)


def _fit(lines: list[bytes]) -> list[bytes]:
    """``lines`` with any line over ``MAX_LINE`` octets folded before one of its blanks.

    Folding only inserts a line break before a blank that is already there, so
    unfolding gives back the very same field.  A line without such a blank stays.
    """
    out: list[bytes] = []
    for line in lines:
        while len(line) > MAX_LINE:
            start = len(line) - len(line.lstrip(b" \t")) + 1
            end = MAX_LINE + 1
            cut = max(line.rfind(b" ", start, end), line.rfind(b"\t", start, end))
            if cut < start:
                break
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out
