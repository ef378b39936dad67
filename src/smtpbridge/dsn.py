"""Delivery status notifications (RFC 3464): the bounce a spooled message's sender gets
when it cannot be delivered (a 5xx upstream, or ``max_age`` reached).

Pure: builds the message as CRLF body lines for the spool; sending it is the queue
runner's job.
"""

from __future__ import annotations

import datetime
import email.utils
import secrets
from collections.abc import Sequence

import attr

from smtpbridge.model import Reply

#: How much of the original message a bounce quotes: its header section, at most this.
HEADER_LIMIT = 64 * 1024


@attr.frozen
class Failure:
    """One recipient that could not be delivered, and why."""

    recipient: str
    status: str  # the enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the upstream's reply on one line, or the bridge's reason
    reply: Reply | None = None  # the upstream's reply, when it gave one


def header_section(lines: Sequence[bytes]) -> list[bytes]:
    """The header section of a message's first lines (up to the empty line), bounded."""
    out: list[bytes] = []
    size = 0
    for line in lines:
        if not line:
            break
        size += len(line) + 2
        if size > HEADER_LIMIT:
            break
        out.append(line)
    return out


def _clean(text: str) -> str:
    """One header-safe line: no control characters, at most 900 characters."""
    return "".join(c if c.isprintable() else " " for c in text)[:900]


def bounce(*, reporting_host: str, from_address: str, to_address: str, queue_id: str,
           arrival: float, now: float, failures: Sequence[Failure],
           original_headers: Sequence[bytes], reason: str) -> list[bytes]:
    """A ``multipart/report; report-type=delivery-status`` message, as body lines.

    C{from_address} is the address the bounce comes from (the account's address where
    the provider insists on it), C{to_address} the original envelope sender.
    """
    boundary = f"smtpbridge-{secrets.token_hex(12)}"
    when = email.utils.format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
    arrived = email.utils.format_datetime(
        datetime.datetime.fromtimestamp(arrival, datetime.UTC))
    host = _clean(reporting_host)
    lines = [
        f"From: Mail Delivery System <{from_address}>",
        f"To: <{to_address}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {when}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"This is the mail bridge at {host}.",
        "",
        "Your message could not be delivered to the following recipients.",
        f"Reason: {_clean(reason)}",
        "",
    ]
    for failure in failures:
        lines.append(f"<{_clean(failure.recipient)}>: {_clean(failure.diagnostic)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {host}",
        f"X-Smtpbridge-Queue-ID: {queue_id}",
        f"Arrival-Date: {arrived}",
    ]
    for failure in failures:
        lines += [
            "",
            f"Final-Recipient: rfc822; {_clean(failure.recipient)}",
            "Action: failed",
            f"Status: {failure.status}",
            f"Diagnostic-Code: smtp; {_clean(failure.diagnostic)}",
            f"Last-Attempt-Date: {when}",
        ]
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    body = [line.encode("utf-8") for line in lines]
    body += list(original_headers)
    body += [b"", f"--{boundary}--".encode("ascii")]
    return body
