"""SMTP grammar without I/O: commands, parameters, replies and the DATA line codec.

Parsing is permissive where legacy clients need it (as Postfix is) and strict
where the bridge's safety depends on it: the DATA codec never lets a bare CR or
LF through, so nothing a client sends can end the upstream's DATA early.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import attr

from smtpbridge.errors import SMTPReplyError
from smtpbridge.model import Reply

COMMAND_UNRECOGNIZED = Reply(500, "5.5.2", "Syntax error, command unrecognized")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_PARAMETER = Reply(501, "5.5.4", "Bad parameter syntax")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")

END_OF_DATA: bytes = b".\r\n"

MAX_ADDRESS_OCTETS = 254

_BLANKS = " \t"
_TRAILING = " \t\r\n\x0b\x0c"
_BLANK_RUN = re.compile(r"[ \t]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BRACKETED = re.compile(r'<((?:"(?:[^"\\]|\\.)*"|[^">])*)>', re.DOTALL)
_ROUTE_DOMAIN = r"@(?:\[[^\]]*\]|[^,:@\[\]]+)"
_ROUTE = re.compile(rf"{_ROUTE_DOMAIN}(?:,{_ROUTE_DOMAIN})*:")
_QUOTED_LOCAL = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_LABEL = r'[^\s.<>@\[\]"\\(),;:]+'
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_BAD_VALUE = re.compile(r"[\x00-\x20=\x7f-\x9f]")
_REPLY_LINE = re.compile(r"([2-5][0-9]{2})(?:([ -])(.*))?", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")


@attr.frozen
class Command:
    """One command line: the upper-cased verb and the rest of the line."""

    verb: str
    argument: str


def parse_command(line: bytes) -> Command:
    """Split a command line (without its line ending) into verb and argument.

    The line is UTF-8 (RFC 6531); anything that is not a verb of ASCII letters
    gets 500 5.5.2.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise SMTPReplyError(COMMAND_UNRECOGNIZED)
    verb, argument = _split_word(text.lstrip(_BLANKS).rstrip(_TRAILING))
    if not (verb.isascii() and verb.isalpha()):
        raise SMTPReplyError(COMMAND_UNRECOGNIZED)
    return Command(verb.upper(), argument)


def _split_word(text: str) -> tuple[str, str]:
    """The first blank-delimited word of ``text`` and what follows the blanks after it."""
    parts = _BLANK_RUN.split(text, maxsplit=1)
    return parts[0], parts[1] if len(parts) > 1 else ""


def parse_mail_from(argument: str) -> tuple[str, dict[str, str | None]]:
    """The sender ("" for the null sender) and ESMTP parameters of MAIL FROM."""
    return _parse_path_argument(argument, "FROM:", MAIL_SYNTAX, BAD_SENDER, sender=True)


def parse_rcpt_to(argument: str) -> tuple[str, dict[str, str | None]]:
    """The recipient and ESMTP parameters of RCPT TO; a bare postmaster is allowed."""
    return _parse_path_argument(argument, "TO:", RCPT_SYNTAX, BAD_RECIPIENT, sender=False)


def _parse_path_argument(
    argument: str, keyword: str, syntax: Reply, bad: Reply, sender: bool
) -> tuple[str, dict[str, str | None]]:
    """Shared grammar of MAIL and RCPT: keyword, path in angle brackets (or not), parameters."""
    if argument[: len(keyword)].upper() != keyword:
        raise SMTPReplyError(syntax)
    rest = argument[len(keyword) :].lstrip(_BLANKS)
    if not rest:
        raise SMTPReplyError(syntax)
    if rest.startswith("<"):
        match = _BRACKETED.match(rest)
        if match is None:
            raise SMTPReplyError(bad)
        path = match[1]
        tail = rest[match.end() :]
        if tail and tail[0] not in _BLANKS:
            raise SMTPReplyError(syntax)
    else:
        path, tail = _split_word(rest)
    if path == "" and sender:
        address = ""
    else:
        address = _strip_route(path, bad)
        if not (_valid_address(address) or (not sender and address.lower() == "postmaster")):
            raise SMTPReplyError(bad)
    return address, _parse_params(tail)


def _strip_route(path: str, bad: Reply) -> str:
    """Drop an RFC 5321 source route ("@a,@b:user@domain"); relays ignore it."""
    if not path.startswith("@"):
        return path
    match = _ROUTE.match(path)
    if match is None:
        raise SMTPReplyError(bad)
    return path[match.end() :]


def _valid_address(address: str) -> bool:
    """Whether ``address`` is a plausible local@domain mailbox (UTF-8 allowed)."""
    try:
        octets = len(address.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    if octets > MAX_ADDRESS_OCTETS or _CONTROL.search(address):
        return False
    if "<" in address or ">" in address:
        return False
    if address.startswith('"'):
        match = _QUOTED_LOCAL.match(address)
        if match is None or address[match.end() : match.end() + 1] != "@":
            return False
        domain = address[match.end() + 1 :]
    else:
        local, at, domain = address.partition("@")
        if not at or not local or " " in local or '"' in local:
            return False
    return _valid_domain(domain)


def _valid_domain(domain: str) -> bool:
    """A dotted name, or an address literal such as [192.0.2.1] or [IPv6:::1]."""
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if "%" in literal:
            return False
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            return False
        return True
    return _DOMAIN.fullmatch(domain) is not None


def _parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters "KEY=VALUE" or "KEY"; keys upper-cased, values as sent."""
    params: dict[str, str | None] = {}
    text = text.strip(_BLANKS)
    if not text:
        return params
    for item in _BLANK_RUN.split(text):
        key, equals, value = item.partition("=")
        if _KEYWORD.fullmatch(key) is None:
            raise SMTPReplyError(BAD_PARAMETER)
        if equals and (not value or _BAD_VALUE.search(value)):
            raise SMTPReplyError(BAD_PARAMETER)
        key = key.upper()
        if key in params:
            raise SMTPReplyError(BAD_PARAMETER)
        params[key] = value if equals else None
    return params


def reply_line(reply: Reply) -> str:
    """A reply on one line, for the text of an error or a log line."""
    parts = [str(reply.code), reply.enhanced or "", reply.text.replace("\n", " ")]
    return " ".join(part for part in parts if part)


def format_reply(reply: Reply) -> bytes:
    """The wire form of a reply, multi-line when its text holds "\\n".

    The enhanced code, when there is one, starts every line (RFC 2034).
    """
    if not 200 <= reply.code <= 599:
        raise ValueError(f"not an SMTP reply code: {reply.code!r}")
    lines = reply.text.replace("\r", "").split("\n")
    last = len(lines) - 1
    out = []
    for index, line in enumerate(lines):
        body = " ".join(part for part in (reply.enhanced, line) if part)
        if index < last:
            out.append(f"{reply.code}-{body}")
        else:
            out.append(f"{reply.code} {body}" if body else str(reply.code))
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")


def parse_enhanced(text: str) -> tuple[str | None, str]:
    """Split a leading enhanced status code "X.Y.Z" (RFC 3463) off a reply text."""
    match = _ENHANCED.match(text)
    if match is None:
        return None, text
    return f"{match[1]}.{match[2]}.{match[3]}", text[match.end() :]


class ReplyTooLong(ValueError):
    """A reply went on beyond the parser's limits: a hostile or broken server."""


class ReplyParser:
    """Accumulates reply lines (without line endings) from an SMTP server.

    A reply may have at most C{max_lines} lines and C{max_bytes} octets, so a server
    cannot make the bridge hold an endless reply.
    """

    def __init__(self, max_lines: int = 100, max_bytes: int = 64 * 1024) -> None:
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._reset()

    def _reset(self) -> None:
        self._code: int | None = None
        self._enhanced: str | None = None
        self._lines: list[str] = []
        self._bytes = 0

    def feed(self, line: bytes) -> Reply | None:
        """Take one line; the complete reply after its last line, else None."""
        self._bytes += len(line) + 2
        if len(self._lines) >= self._max_lines or self._bytes > self._max_bytes:
            self._reset()
            raise ReplyTooLong(f"a reply of more than {self._max_lines} lines or "
                               f"{self._max_bytes // 1024} KiB")
        match = _REPLY_LINE.fullmatch(line.decode("utf-8", errors="replace"))
        if match is None:
            self._reset()
            raise ValueError(f"not an SMTP reply line: {line[:80]!r}")
        code = int(match[1])
        text = match[3] or ""
        if self._code is None:
            self._code = code
            enhanced, rest = parse_enhanced(text)
            if enhanced is not None and enhanced[0] == match[1][0]:
                self._enhanced = enhanced
                text = rest
        elif code != self._code:
            self._reset()
            raise ValueError(f"reply code changed within a multi-line reply: {line[:80]!r}")
        elif self._enhanced is not None:
            enhanced, rest = parse_enhanced(text)
            if enhanced == self._enhanced:
                text = rest
        self._lines.append(text)
        if match[2] == "-":
            return None
        reply = Reply(code, self._enhanced, "\n".join(self._lines))
        self._reset()
        return reply


class DataDecoder:
    """Turns the DATA bytes of a client into body lines, incrementally.

    CRLF and bare LF both end a line; only CRLF "." CRLF ends the data (unless
    ``accept_bare_lf_end``), a bare CR becomes a space, and over-long lines are
    broken with a leading space as Postfix does.  The result does not depend on
    how the input is chunked, and a partial line held between calls stays near
    ``max_line_length`` octets.  ``size`` counts the message as the client sent it.
    """

    def __init__(self, accept_bare_lf_end: bool = False, max_line_length: int = 998) -> None:
        if max_line_length < 2:
            raise ValueError("max_line_length must be at least 2")
        self._accept_bare_lf_end = accept_bare_lf_end
        self._limit = max_line_length
        # The unfinished line; once its first pieces are emitted it holds the rest
        # after a leading space, so the dot rules can no longer apply to it.
        self._partial = b""
        self._after_crlf = True
        self._done = False
        self.size = 0  # RFC 1870's size: the end-of-data line and stuffing dots left out

    def feed(self, data: bytes) -> tuple[list[bytes], bytes | None]:
        """Body lines completed by ``data``, and what followed the end of data (or None)."""
        if self._done:
            raise RuntimeError("DataDecoder fed after the end of data")
        self.size += len(data)
        cut = data.rfind(b"\n") + 1
        if cut:
            plain = _plain_lines(self._partial + data[:cut], self._limit)
            if plain is not None:
                self._after_crlf = True
                self._hold(data[cut:], plain)
                return plain, None
        parts = data.split(b"\n")
        if self._partial:
            parts[0] = self._partial + parts[0]
        limit = self._limit
        accept_bare_lf_end = self._accept_bare_lf_end
        after_crlf = self._after_crlf
        lines: list[bytes] = []
        append = lines.append
        last = len(parts) - 1
        for index in range(last):
            line = parts[index]
            crlf = line.endswith(b"\r")
            if crlf:
                line = line[:-1]
            if line.startswith(b"."):
                if line == b".":
                    if accept_bare_lf_end or (crlf and after_crlf):
                        self._done = True
                        self._partial = b""
                        rest = b"\n".join(parts[index + 1 :])
                        self.size -= len(rest) + len(parts[index]) + 1
                        return lines, rest
                else:
                    line = line[1:]
                    self.size -= 1
            if b"\r" in line:
                line = line.replace(b"\r", b" ")
            if len(line) > limit:
                lines.extend(_break_line(line, limit))
            else:
                append(line)
            after_crlf = crlf
        self._after_crlf = after_crlf
        self._hold(parts[last], lines)
        return lines, None

    def _hold(self, partial: bytes, lines: list[bytes]) -> None:
        """Keep an unfinished line, first emitting its complete pieces if it is over-long.

        A final CR is held back unchanged: it may be the CR of a CRLF still to come.
        """
        if len(partial) > self._limit + 2:
            held = b"\r" if partial.endswith(b"\r") else b""
            body = partial[: len(partial) - len(held)]
            if body.startswith(b"."):
                body = body[1:]
                self.size -= 1
            pieces = _break_line(body.replace(b"\r", b" "), self._limit)
            lines.extend(pieces[:-1])
            partial = pieces[-1] + held
        self._partial = partial


def _plain_lines(complete: bytes, limit: int) -> list[bytes] | None:
    """The lines of ``complete`` if each ends in CRLF and none needs rewriting, else None.

    This is the common case, checked and split with a few passes over the bytes.
    """
    crlf = complete.count(b"\r\n")
    if complete.count(b"\n") != crlf or complete.count(b"\r") != crlf:
        return None
    if complete.startswith(b".") or b"\n." in complete:
        return None
    lines = complete.split(b"\r\n")
    lines.pop()
    if max(map(len, lines)) > limit:
        return None
    return lines


def _break_line(line: bytes, limit: int) -> list[bytes]:
    """Postfix's smtp_line_length_limit: pieces of ``limit`` octets, continued with a space."""
    step = limit - 1
    pieces = [line[:limit]]
    pieces.extend([b" " + line[start : start + step] for start in range(limit, len(line), step)])
    return pieces


def encode_lines(lines: Iterable[bytes]) -> bytes:
    """Dot-stuffed body lines, each ended with CRLF, ready to send after DATA.

    A line holding CR or LF is refused: it could end the data early upstream.
    """
    if not isinstance(lines, list):
        lines = list(lines)
    if not lines:
        return b""
    body = b"\n".join(lines)
    if b"\r" in body or body.count(b"\n") != len(lines) - 1:
        raise ValueError("a body line holds CR or LF")
    body = body.replace(b"\n.", b"\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\n", b"\r\n") + b"\r\n"
