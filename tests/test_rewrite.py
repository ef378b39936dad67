"""Tests for smtpbridge.rewrite: the Received: trace header and the From: rewrite."""

from __future__ import annotations

import datetime
import re

import attr
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtpbridge.model import ClientInfo
from smtpbridge.rewrite import HeaderTooLarge, SenderRewriter, rewrite_headers
from smtpbridge.trace import received_header

WHEN = datetime.datetime(2026, 11, 23, 6, 7, 33, tzinfo=datetime.UTC)
DATE = "Mon, 23 Nov 2026 06:07:33 +0000"
CLIENT = ClientInfo(
    peer_host="192.0.2.10",
    peer_port=40000,
    listener="smtps",
    session_id="3fdb625ddf7d",
    helo="printer",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_256_GCM_SHA384",
    login="device",
)
PLAIN = attr.evolve(CLIENT, tls_version=None, tls_cipher=None, login=None)
ACCOUNT = "relay@example.com"


def received(client: ClientInfo, recipients: tuple[str, ...] = ("office@example.com",),
             esmtp: bool = True, show_login: bool = True) -> list[str]:
    return [line.decode("utf-8") for line in
            received_header(client, "bridge.example.net", recipients, WHEN, esmtp=esmtp,
                            show_login=show_login)]


def test_received_hides_the_login_by_default() -> None:
    header = "\n".join(line.decode() for line in received_header(
        CLIENT, "bridge.example.net", ["office@example.com"], WHEN))
    assert "device" not in header and "authenticated" not in header
    assert "\twith ESMTPSA " in header  # the protocol keyword still says AUTH was used
    assert "(authenticated as device)" in "\n".join(received(CLIENT, show_login=True))


def unfolded(lines: list[str]) -> str:
    """The header as one line, as a reader unfolds it."""
    return "".join(lines).replace("\t", " ")


# received_header


def test_received_tls_and_auth() -> None:
    assert received(CLIENT) == [
        "Received: from printer ([192.0.2.10])",
        "\t(authenticated as device)",
        "\tby bridge.example.net (smtpbridge, listener smtps)",
        "\twith ESMTPSA (TLSv1.3 TLS_AES_256_GCM_SHA384)",
        "\tid 3fdb625ddf7d",
        f"\tfor <office@example.com>; {DATE}",
    ]


def test_received_plain_several_recipients() -> None:
    """No TLS, no AUTH; with several recipients none is named and the date follows the id."""
    assert received(PLAIN, ("a@example.com", "b@example.com")) == [
        "Received: from printer ([192.0.2.10])",
        "\tby bridge.example.net (smtpbridge, listener smtps)",
        "\twith ESMTP",
        f"\tid 3fdb625ddf7d; {DATE}",
    ]


@pytest.mark.parametrize(
    ("tls", "login", "esmtp", "keyword"),
    [
        (False, False, True, "ESMTP"),
        (True, False, True, "ESMTPS"),
        (False, True, True, "ESMTPA"),
        (True, True, True, "ESMTPSA"),
        (False, False, False, "SMTP"),
        (True, False, False, "SMTPS"),
        (False, True, False, "SMTPA"),
        (True, True, False, "SMTPSA"),
    ],
)
def test_received_protocol_keyword(tls: bool, login: bool, esmtp: bool, keyword: str) -> None:
    client = attr.evolve(
        CLIENT,
        tls_version="TLSv1.2" if tls else None,
        tls_cipher="ECDHE-RSA-AES128-GCM-SHA256" if tls else None,
        login="device" if login else None,
    )
    header = unfolded(received(client, esmtp=esmtp))
    assert re.search(rf" with {keyword}( |;)", header)
    assert ("(authenticated as device)" in header) is login
    assert ("(TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256)" in header) is tls


def test_received_without_helo() -> None:
    """A client that never said HELO/EHLO: recorded as such, and no ESMTP keyword."""
    header = received(attr.evolve(PLAIN, helo=None))
    assert header[0] == "Received: from [192.0.2.10] (no HELO)"
    assert "\twith SMTP" in header


@pytest.mark.parametrize(
    ("peer", "literal"),
    [
        ("2001:db8::1", "[IPv6:2001:db8::1]"),
        ("2001:0db8:0000::0001", "[IPv6:2001:db8::1]"),
        ("fe80::1%eth0", "[IPv6:fe80::1]"),
        ("::ffff:192.0.2.7", "[192.0.2.7]"),
    ],
)
def test_received_ipv6_peer(peer: str, literal: str) -> None:
    client = attr.evolve(PLAIN, peer_host=peer)
    assert received(client)[0] == f"Received: from printer ({literal})"


def test_received_no_recipient() -> None:
    assert "for" not in unfolded(received(PLAIN, ()))


def test_received_hostile_values() -> None:
    """CR, LF, parentheses and quotes from the client cannot add headers or end comments."""
    client = attr.evolve(
        CLIENT,
        helo='evil)\r\nBcc: victim@example.com\r\n("',
        login="x) by forged.example (\r\nX-Evil: 1",
    )
    lines = received(client)
    assert lines[0] == "Received: from evil???Bcc:?victim@example.com???? ([192.0.2.10])"
    assert lines[1] == "\t(authenticated as x? by forged.example ???X-Evil: 1)"
    for line in lines:
        assert not re.search(r"[\x00-\x1f\x7f]", line.lstrip("\t"))
    assert [line[:1] for line in lines[1:]] == ["\t"] * (len(lines) - 1)


def test_received_client_values_limited() -> None:
    client = attr.evolve(CLIENT, helo="h" * 5000, login="l" * 5000)
    header = unfolded(received(client))
    assert "h" * 255 in header and "h" * 256 not in header
    assert "l" * 255 in header and "l" * 256 not in header


def test_received_non_ascii_client_values() -> None:
    """HELO and login stay ASCII; a UTF-8 recipient (SMTPUTF8) is kept as UTF-8."""
    client = attr.evolve(CLIENT, helo="drücker", login="jörg")
    raw = received_header(client, "bridge.example.net", ["bü@example.com"], WHEN,
                          show_login=True)
    text = b"\n".join(raw).decode("utf-8")
    assert "from dr?cker " in text
    assert "(authenticated as j?rg)" in text
    assert "for <bü@example.com>;" in text


def test_received_login_blanks_collapsed() -> None:
    client = attr.evolve(CLIENT, login="  scan   to\tmail  ")
    assert received(client)[1] == "\t(authenticated as scan to?mail)"


def test_received_long_clause_folded() -> None:
    client = attr.evolve(CLIENT, login=" ".join(["word"] * 40))
    lines = received(client)
    assert all(len(line) <= 78 for line in lines)
    assert "(authenticated as " + " ".join(["word"] * 40) + ")" in unfolded(lines)


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


@given(helo=st.none() | st.text(), login=st.none() | st.text(), rcpt=st.text(),
       listener=st.text())
@example(helo="0" * 64, login=None, rcpt="", listener="")  # "from" must not stand alone
@settings(max_examples=300)
def test_received_any_client_values(helo: str | None, login: str | None, rcpt: str,
                                    listener: str) -> None:
    """Whatever the client sends: one well-formed folded header ending in the date."""
    client = attr.evolve(CLIENT, helo=helo, login=login, listener=listener)
    raw = received_header(client, "bridge.example.net", [rcpt], WHEN)
    lines = [line.decode("utf-8") for line in raw]
    assert lines[0].startswith("Received: from ")
    for line in lines:
        assert len(line.encode("utf-8")) <= 998
        assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", line)
        assert line.strip(" \t")
    assert all(line.startswith("\t") for line in lines[1:])
    header = unfolded(lines)
    assert _balanced(header)
    assert header.count(";") == 1 and header.endswith(f"; {DATE}")
    assert f" with {'E' if helo else ''}SMTPS{'A' if login else ''} " in header


# SenderRewriter


def rewrite(*lines: bytes) -> list[bytes]:
    return rewrite_headers(list(lines), ACCOUNT)


def test_bare_from() -> None:
    assert rewrite(b"From: scanner@printer.local", b"Subject: Scan", b"", b"body") == [
        b"From: relay@example.com",
        b"Reply-To: scanner@printer.local",
        b"Subject: Scan",
        b"",
        b"body",
    ]


def test_display_name_with_encoded_words() -> None:
    name = b"=?UTF-8?Q?Dr=C3=BCcker_2=2E_Stock?= =?UTF-8?B?KEJ1ZXJvKQ==?="
    assert rewrite(b"Date: x", b"From: " + name + b" <scan@printer.local>", b"", b"b") == [
        b"Date: x",
        b"From: " + name + b" <relay@example.com>",
        b"Reply-To: " + name + b" <scan@printer.local>",
        b"",
        b"b",
    ]


def test_folded_from() -> None:
    assert rewrite(b'from:  "Scanner, 2nd floor" (Lexmark)', b"\t<scan@printer.local>",
                   b"  (asset 17)", b"To: office@example.com", b"") == [
        b'from:  "Scanner, 2nd floor" (Lexmark)',
        b"\t<relay@example.com>",
        b"  (asset 17)",
        b'Reply-To:  "Scanner, 2nd floor" (Lexmark)',
        b"\t<scan@printer.local>",
        b"  (asset 17)",
        b"To: office@example.com",
        b"",
    ]


@pytest.mark.parametrize("reply_to", [b"Reply-To: office@example.com",
                                      b"REPLY-TO :office@example.com"])
@pytest.mark.parametrize("before", [True, False])
def test_existing_reply_to_kept(reply_to: bytes, before: bool) -> None:
    headers = [b"From: Scanner <scan@printer.local>", b"Subject: x"]
    headers.insert(0 if before else 2, reply_to)
    out = rewrite(*headers, b"", b"Reply-To: body")
    expected = [b"From: Scanner <relay@example.com>", b"Subject: x"]
    expected.insert(0 if before else 2, reply_to)
    assert out == [*expected, b"", b"Reply-To: body"]


def test_no_from_added() -> None:
    assert rewrite(b"Subject: x", b"To: a@example.com", b"", b"From: in the body") == [
        b"Subject: x",
        b"To: a@example.com",
        b"From: <relay@example.com>",
        b"",
        b"From: in the body",
    ]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ([b"", b"body"], [b"From: <relay@example.com>", b"", b"body"]),
        ([b"Hello, this is a scan.", b"From: x@y"],
         [b"From: <relay@example.com>", b"", b"Hello, this is a scan.", b"From: x@y"]),
        ([b" indented first line"], [b"From: <relay@example.com>", b"", b" indented first line"]),
        ([b"Subject: x", b"no header here", b"From: x@y"],
         [b"Subject: x", b"From: <relay@example.com>", b"", b"no header here", b"From: x@y"]),
        ([], [b"From: <relay@example.com>"]),
    ],
)
def test_no_header_section(message: list[bytes], expected: list[bytes]) -> None:
    """What does not look like a header starts the body, after an inserted empty line."""
    assert rewrite_headers(message, ACCOUNT) == expected


def test_header_only_message() -> None:
    """A message without a body keeps having none: no empty line is added at close."""
    rewriter = SenderRewriter(ACCOUNT)
    assert rewriter.feed([b"From: a@printer.local", b"Subject: x"]) == []
    assert rewriter.close() == [b"From: relay@example.com", b"Reply-To: a@printer.local",
                                b"Subject: x"]


def test_header_ends_mid_batch() -> None:
    rewriter = SenderRewriter(ACCOUNT)
    assert rewriter.feed([b"Subject: x"]) == []
    assert rewriter.feed([b"From: a@printer.local", b"", b"line 1", b"line 2"]) == [
        b"Subject: x", b"From: relay@example.com", b"Reply-To: a@printer.local",
        b"", b"line 1", b"line 2",
    ]
    body = [b"From: not a header", b""]
    assert rewriter.feed(body) is body
    assert rewriter.close() == []
    with pytest.raises(RuntimeError):
        rewriter.feed([b"late"])


def test_angle_brackets_in_comment_or_quotes_are_no_address() -> None:
    assert rewrite(b'From: scan@printer.local (Printer <lab>) "<x@y>"', b"")[:2] == [
        b"From: relay@example.com",
        b'Reply-To: scan@printer.local (Printer <lab>) "<x@y>"',
    ]
    assert rewrite(b'From: "Lab <scan@old>" (a <b>) <scan@printer.local> (c <d>)', b"")[0] == (
        b'From: "Lab <scan@old>" (a <b>) <relay@example.com> (c <d>)'
    )
    escaped = b'"Lab \\" <x@y>" (\\( <z@w>) <scan@printer.local>'
    assert rewrite(b"From: " + escaped, b"")[0] == (
        b"From: " + escaped.replace(b"scan@printer.local", b"relay@example.com")
    )


def test_unquoted_comma_in_display_name() -> None:
    assert rewrite(b"From: Doe, John <john@printer.local>", b"")[0] == (
        b"From: Doe, John <relay@example.com>"
    )


@pytest.mark.parametrize("value", [b"A <a@printer.local>, B <b@printer.local>",
                                   b"a@printer.local, B <b@printer.local>",
                                   b"B <b@printer.local>, a@printer.local"])
def test_several_mailboxes_become_the_account(value: bytes) -> None:
    assert rewrite(b"From: " + value, b"") == [
        b"From: relay@example.com", b"Reply-To: " + value, b"",
    ]


def test_every_from_rewritten_one_reply_to() -> None:
    assert rewrite(b"From: A <a@printer.local>", b"Subject: x", b"FROM: b@printer.local",
                   b"") == [
        b"From: A <relay@example.com>",
        b"Reply-To: A <a@printer.local>",
        b"Subject: x",
        b"FROM: relay@example.com",
        b"",
    ]


@pytest.mark.parametrize(
    ("value", "rewritten"),
    [(b" Scanner <Relay@Example.com>", b" Scanner <relay@example.com>"),
     (b" relay@example.com (Scanner)", b" relay@example.com")],
)
def test_from_already_the_account(value: bytes, rewritten: bytes) -> None:
    """No Reply-To: when the From: already names the account."""
    message = [b"From:" + value, b"Subject: x", b"", b"b"]
    assert rewrite_headers(message, ACCOUNT) == [b"From:" + rewritten, *message[1:]]


def test_empty_from_gets_no_reply_to() -> None:
    assert rewrite(b"From:", b"") == [b"From: relay@example.com", b""]


def test_long_lines_stay_within_limit() -> None:
    """A From: or Reply-To: line the rewrite makes longer is folded at one of its blanks."""
    name = b" ".join([b"word"] * 197)  # 984 octets
    first = b"From: " + name + b" <a@b.c>"
    assert len(first) == 998
    out = rewrite(first, b"")
    assert all(len(line) <= 998 for line in out)
    assert b"".join(out[:2]) == b"From: " + name + b" <relay@example.com>"
    assert out[1] == b" <relay@example.com>"
    assert b"".join(out[2:4]) == b"Reply-To: " + name + b" <a@b.c>"
    assert out[4:] == [b""]


def test_oversized_header_section_is_refused_not_passed() -> None:
    message = [b"From: a@printer.local"] + [b"X-Filler: " + b"x" * 90] * 10 + [b"", b"b"]
    rewriter = SenderRewriter(ACCOUNT, max_header_bytes=500)
    assert rewriter.feed(message[:4]) == []
    with pytest.raises(HeaderTooLarge) as caught:
        rewriter.feed(message[4:6])
    assert (caught.value.reply.code, caught.value.reply.enhanced) == (552, "5.3.4")
    with pytest.raises(RuntimeError):  # nothing of this message goes out any more
        rewriter.feed(message[6:])


def test_header_section_at_the_limit_is_rewritten() -> None:
    message = [b"From: a@printer.local", b"Subject: x", b""]
    limit = sum(len(line) + 2 for line in message[:2])
    assert rewrite_headers(message, ACCOUNT)[0] == b"From: relay@example.com"
    rewriter = SenderRewriter(ACCOUNT, max_header_bytes=limit)
    assert rewriter.feed(message)[0] == b"From: relay@example.com"
    rewriter = SenderRewriter(ACCOUNT, max_header_bytes=limit - 1)
    with pytest.raises(HeaderTooLarge):
        rewriter.feed(message)


@pytest.mark.parametrize("address", ["relay@example.com\r\nBcc: x@y", "<relay@example.com>",
                                     "relay", "a b@example.com"])
def test_unusable_address_refused(address: str) -> None:
    with pytest.raises(ValueError):
        SenderRewriter(address)


# Properties

_HEADERISH = [
    b"From: Scanner <scan@printer.local>",
    b"from: scan@printer.local",
    b"From: (x <y>) a@b, <c@d>",
    b"Reply-To: x@y",
    b"Subject: x",
    b"X-Long: " + b"z" * 200,
    b" continued",
    b"\t<folded@printer.local>",
    b"",
    b"not a header",
]
_LINE = st.binary(max_size=120).filter(lambda line: b"\r" not in line and b"\n" not in line)
_MESSAGE = st.lists(st.sampled_from(_HEADERISH) | _LINE, max_size=30)


def _batches(lines: list[bytes], cuts: list[int]) -> list[list[bytes]]:
    points = sorted({0, len(lines), *(cut % (len(lines) + 1) for cut in cuts)})
    return [lines[start:end] for start, end in zip(points, points[1:], strict=False)]


@given(lines=_MESSAGE, cuts=st.lists(st.integers(min_value=0), max_size=10),
       limit=st.sampled_from([0, 60, 300, 256 * 1024]))
@settings(max_examples=500)
def test_batching_does_not_matter(lines: list[bytes], cuts: list[int], limit: int) -> None:
    def run(batches: list[list[bytes]]) -> list[bytes] | str:
        rewriter = SenderRewriter(ACCOUNT, max_header_bytes=limit)
        out: list[bytes] = []
        try:
            for batch in batches:
                out += rewriter.feed(batch)
        except HeaderTooLarge:
            return "refused"
        return out + rewriter.close()

    expected = run([list(lines)])
    assert run(_batches(lines, cuts)) == expected
    assert expected == "refused" or all(len(line) <= 998 for line in expected)


@given(headers=st.lists(st.sampled_from(_HEADERISH[:6]), max_size=8),
       body=st.lists(st.sampled_from(_HEADERISH) | _LINE, max_size=30))
@settings(max_examples=300)
def test_body_passes_byte_identical(headers: list[bytes], body: list[bytes]) -> None:
    out = rewrite_headers([*headers, b"", *body], ACCOUNT)
    separator = out.index(b"")
    assert out[separator + 1:] == body
    assert all(not _line.lower().startswith(b"from:") or b"relay@example.com" in _line
               for _line in out[:separator])


@given(body=st.lists(_LINE, max_size=20))
def test_body_is_not_held(body: list[bytes]) -> None:
    rewriter = SenderRewriter(ACCOUNT)
    assert rewriter.feed([b"Subject: x"]) == []
    assert rewriter.feed([b""]) == [b"Subject: x", b"From: <relay@example.com>", b""]
    assert rewriter.feed(body) == body
