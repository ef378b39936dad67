"""The ``Received:`` trace header the bridge puts on top of every message it relays
(RFC 5321 section 4.4, with the RFC 3848 protocol keywords)."""

from __future__ import annotations

import datetime
import email.utils
import re
from collections.abc import Sequence

from smtpbridge.model import ClientInfo
from smtpbridge.networks import address_literal

FOLD_AT = 78  # RFC 5322 2.1.1: lines should not be longer than this
MAX_CLIENT_VALUE = 255  # characters kept of a value a client chose (HELO name, login)

# Characters replaced by "?" in values written into the trace header, besides
# control characters: what could end a comment, open a quoted string or an
# address, or move the "; date" separator.
_WORD_UNSAFE = ' ()\\";<>'
_COMMENT_UNSAFE = '()\\";'
_RECIPIENT_UNSAFE = "()\\;<>"
_BLANK_RUN = re.compile(r" {2,}")


def received_header(
    client: ClientInfo,
    hostname: str,
    recipients: Sequence[str],
    when: datetime.datetime,
    esmtp: bool = True,
    show_login: bool = False,
) -> list[bytes]:
    """The bridge's RFC 5321 section 4.4 trace header for one message, as folded body lines.

    The protocol keyword follows RFC 3848 (``ESMTPSA`` and friends, ``SMTP...``
    when the client said HELO, ``esmtp=False``, or nothing).  A client that sent
    no HELO/EHLO at all is written ``from [192.0.2.7] (no HELO)``.  "for" names the recipient only
    when there is exactly one, so that a message does not reveal its other
    recipients.  The AUTH login is named only with C{show_login} (like Postfix's
    ``smtpd_sasl_authenticated_header``, off by default: recipients need not learn the
    device's account).  Values the client chose (HELO name, login) are cut to
    ``MAX_CLIENT_VALUE`` characters and kept ASCII, with anything that could
    break the header's syntax replaced by "?".  ``when`` should be aware of its
    time zone (a naive one is written as ``-0000``).
    """
    literal = _address_literal(client.peer_host)
    helo = _clean(client.helo or "", _WORD_UNSAFE)
    clauses = [f"from {helo} ({literal})" if helo else f"from {literal} (no HELO)"]
    if client.login and show_login:
        clauses.append(f"(authenticated as {_comment(client.login)})")
    by = _clean(hostname, _WORD_UNSAFE) or "localhost"
    clauses.append(f"by {by} (smtpbridge, listener {_comment(client.listener) or '?'})")
    esmtp = esmtp and bool(client.helo)  # ESMTP is what EHLO starts
    protocol = ("ESMTP" if esmtp else "SMTP") + ("S" if client.tls_version else "")
    protocol += "A" if client.login else ""
    if client.tls_version:
        tls = " ".join(part for part in (client.tls_version, client.tls_cipher) if part)
        clauses.append(f"with {protocol} ({_comment(tls)})")
    else:
        clauses.append(f"with {protocol}")
    clauses.append(f"id {_clean(client.session_id, _WORD_UNSAFE) or '?'}")
    if len(recipients) == 1:
        recipient = _clean(recipients[0], _RECIPIENT_UNSAFE, ascii_only=False)
        clauses.append(f"for <{recipient}>")
    clauses[-1] += "; " + email.utils.format_datetime(when)
    return [line.encode("utf-8") for line in _fold_clauses("Received:", clauses)]


def _address_literal(host: str) -> str:
    """The peer as an RFC 5321 address literal, or its host string made safe."""
    return address_literal(host) or _clean(host, _WORD_UNSAFE + "[]") or "unknown"


def _clean(text: str, unsafe: str, ascii_only: bool = True) -> str:
    """``text`` cut to ``MAX_CLIENT_VALUE`` characters, unprintable or unsafe ones as "?"."""
    text = text[:MAX_CLIENT_VALUE]
    if text.isprintable() and (text.isascii() or not ascii_only) and \
            not any(char in text for char in unsafe):
        return text  # the usual case, checked without a loop in Python over the text
    return "".join(
        "?" if char in unsafe or not char.isprintable() or (ascii_only and not char.isascii())
        else char
        for char in text[:MAX_CLIENT_VALUE]
    )


def _comment(text: str) -> str:
    """``text`` made safe inside a comment: no parentheses, quotes or runs of blanks."""
    return _BLANK_RUN.sub(" ", _clean(text, _COMMENT_UNSAFE)).strip(" ")


def _fold_clauses(name: str, clauses: list[str]) -> list[str]:
    """Each clause on its own line, a clause longer than ``FOLD_AT`` folded at its blanks;
    a keyword stays on the line of its value ("from <helo>", "by <host>")."""
    lines: list[str] = []
    for index, clause in enumerate(clauses):
        line = f"{name} " if index == 0 else "\t"
        words_on_line = 0
        for word in clause.split(" "):
            if words_on_line == 0:
                line += word
            elif words_on_line < 2 or len(line) + 1 + len(word) <= FOLD_AT:
                line += " " + word
            else:
                lines.append(line)
                line, words_on_line = "\t" + word, 0
            words_on_line += 1
        lines.append(line)
    return lines
