"""Tests for smtpbridge.wire: command grammar, replies and the DATA line codec."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpbridge.errors import SMTPReplyError
from smtpbridge.model import Reply
from smtpbridge.wire import (
    END_OF_DATA,
    Command,
    DataDecoder,
    ReplyParser,
    ReplyTooLong,
    encode_lines,
    format_reply,
    parse_command,
    parse_enhanced,
    parse_mail_from,
    parse_rcpt_to,
)

UNRECOGNIZED = Reply(500, "5.5.2", "Syntax error, command unrecognized")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")


def reply_of(call: Callable[..., object], *args: object) -> Reply:
    """The reply carried by the SMTPReplyError that ``call(*args)`` raises."""
    with pytest.raises(SMTPReplyError) as info:
        call(*args)
    return info.value.reply


# parse_command


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"EHLO client.example", Command("EHLO", "client.example")),
        (b"mail FROM:<a@b.c>", Command("MAIL", "FROM:<a@b.c>")),
        (b"QUIT", Command("QUIT", "")),
        (b"QUIT   ", Command("QUIT", "")),
        (b"   NOOP", Command("NOOP", "")),
        (b"\tRCPT\t TO:<a@b.c> \t", Command("RCPT", "TO:<a@b.c>")),
        (b"MAIL FROM:<a@b.c>  SIZE=1", Command("MAIL", "FROM:<a@b.c>  SIZE=1")),
        (b"MAIL    FROM:<a@b.c>", Command("MAIL", "FROM:<a@b.c>")),
        ("RCPT TO:<jörg@bücher.example>".encode(), Command("RCPT", "TO:<jörg@bücher.example>")),
        (b"AUTH PLAIN AGEAYg==\r", Command("AUTH", "PLAIN AGEAYg==")),
    ],
)
def test_parse_command(line: bytes, command: Command) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    "line",
    [b"", b"   ", b"\t \t", b"\xff\xfeHELO", b"HELO \xc3", b"MA1L FROM:<a@b.c>", "MÄIL x".encode(),
     b"<a@b.c>", b"X-FOO bar", b"HELO\x00 x"],
)
def test_parse_command_unrecognized(line: bytes) -> None:
    assert reply_of(parse_command, line) == UNRECOGNIZED


@given(st.binary(max_size=60))
def test_parse_command_total(line: bytes) -> None:
    """Any line gives a command of ASCII letters or the 500 reply, never another error."""
    try:
        command = parse_command(line)
    except SMTPReplyError as error:
        assert error.reply == UNRECOGNIZED
    else:
        assert command.verb.isascii() and command.verb.isalpha() and command.verb.isupper()
        assert command.argument == command.argument.strip(" \t\r\n\x0b\x0c")


# MAIL FROM / RCPT TO


@pytest.mark.parametrize(
    ("argument", "sender", "params"),
    [
        ("FROM:<a@b.c>", "a@b.c", {}),
        ("from:<a@b.c>", "a@b.c", {}),
        ("From: <a@b.c>", "a@b.c", {}),
        ("FROM:\t<a@b.c>", "a@b.c", {}),
        ("FROM:<>", "", {}),
        ("FROM:<> BODY=7BIT", "", {"BODY": "7BIT"}),
        ("FROM:<a@b.c> SIZE=123 BODY=8BITMIME", "a@b.c", {"SIZE": "123", "BODY": "8BITMIME"}),
        ("FROM:<a@b.c>  smtputf8\tbody=8bitmime", "a@b.c", {"SMTPUTF8": None, "BODY": "8bitmime"}),
        ("FROM:<a@b.c> AUTH=<>", "a@b.c", {"AUTH": "<>"}),
        ("FROM:a@b.c", "a@b.c", {}),
        ("FROM: a@b.c SIZE=5", "a@b.c", {"SIZE": "5"}),
        ("FROM:<@relay.example:a@b.c>", "a@b.c", {}),
        ('FROM:<"a b"@c.d>', '"a b"@c.d', {}),
        ('FROM:<"a\\"@b"@c.d>', '"a\\"@b"@c.d', {}),
        ("FROM:<jörg@bücher.example> SMTPUTF8", "jörg@bücher.example", {"SMTPUTF8": None}),
        ("FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]", {}),
        ("FROM:<a@[IPv6:::1]>", "a@[IPv6:::1]", {}),
        ("FROM:<a@[ipv6:2001:db8::1]>", "a@[ipv6:2001:db8::1]", {}),
        ("FROM:<a+tag@localhost>", "a+tag@localhost", {}),
        ("FROM:<a@b.c> X-ID=naïve", "a@b.c", {"X-ID": "naïve"}),
    ],
)
def test_parse_mail_from(argument: str, sender: str, params: dict[str, str | None]) -> None:
    assert parse_mail_from(argument) == (sender, params)


@pytest.mark.parametrize(
    ("argument", "recipient", "params"),
    [
        ("TO:<u@d.c>", "u@d.c", {}),
        ("to:<u@d.c>", "u@d.c", {}),
        ("To: <u@d.c>", "u@d.c", {}),
        ("TO:u@d.c", "u@d.c", {}),
        ("TO:<postmaster>", "postmaster", {}),
        ("TO:<PostMaster>", "PostMaster", {}),
        ("TO:<postmaster@d.c>", "postmaster@d.c", {}),
        ("TO:<@relay1,@relay2:u@d.c>", "u@d.c", {}),
        ("TO:<@[192.0.2.1],@relay2:u@d.c>", "u@d.c", {}),
        (
            "TO:<u@d.c> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@d.c",
            "u@d.c",
            {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;u@d.c"},
        ),
    ],
)
def test_parse_rcpt_to(argument: str, recipient: str, params: dict[str, str | None]) -> None:
    assert parse_rcpt_to(argument) == (recipient, params)


@pytest.mark.parametrize(
    "argument",
    ["", "<a@b.c>", "FROM", "FROM:", "FROM:  ", "FRM:<a@b.c>", "FROM <a@b.c>", "TO:<a@b.c>",
     "FROM:<a@b.c>SIZE=1"],
)
def test_mail_from_syntax(argument: str) -> None:
    assert reply_of(parse_mail_from, argument) == MAIL_SYNTAX


@pytest.mark.parametrize(
    "argument",
    ["", "<u@d.c>", "TO", "TO:", "T0:<u@d.c>", "FROM:<u@d.c>", "TO:<u@d.c>NOTIFY=NEVER"],
)
def test_rcpt_to_syntax(argument: str) -> None:
    assert reply_of(parse_rcpt_to, argument) == RCPT_SYNTAX


BAD_ADDRESSES = [
    "a",
    "@b.c",
    "a@",
    "a@@b.c",
    "a@b@c.d",
    "a b@c.d",
    "a@b c.d",
    "a@b..c",
    "a@.b.c",
    "a@b.c.",
    "a\x01@b.c",
    "a@b\x7f.c",
    "a@b.c\x85",
    "a<b@c.d",
    'a"b@c.d',
    '"a@b.c',
    '"a"b@c.d',
    '"a<b"@c.d',
    "a@[300.1.1.1]",
    "a@[IPv6:zz]",
    "a@[IPv6:fe80::1%eth0]",
    "a@[192.0.2.1",
    "a@b.c]",
    "@relay:",
    "@relay:a",
    "@relay,a@b.c",
    "x" * 243 + "@example.com",
    "é" * 122 + "@example.com",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_bad_sender(address: str) -> None:
    assert reply_of(parse_mail_from, f"FROM:<{address}>") == BAD_SENDER


@pytest.mark.parametrize("address", [*BAD_ADDRESSES, "", "postmaster@", "postmasters"])
def test_bad_recipient(address: str) -> None:
    assert reply_of(parse_rcpt_to, f"TO:<{address}>") == BAD_RECIPIENT


@pytest.mark.parametrize("argument", ["FROM:<a@b.c", "FROM:<a@b.c>>", "FROM:<a@b>.c>"])
def test_bad_sender_brackets(argument: str) -> None:
    assert reply_of(parse_mail_from, argument).enhanced in ("5.1.7", "5.5.4")
    assert reply_of(parse_mail_from, argument).code == 501


def test_bare_postmaster_only_for_recipients() -> None:
    assert reply_of(parse_mail_from, "FROM:<postmaster>") == BAD_SENDER


def test_address_length_limit() -> None:
    """254 octets of UTF-8 are allowed, 255 are not."""
    longest = "x" * 242 + "@example.com"
    assert len(longest) == 254
    assert parse_rcpt_to(f"TO:<{longest}>")[0] == longest
    utf8 = "é" * 121 + "@example.co"
    assert len(utf8.encode()) == 253
    assert parse_rcpt_to(f"TO:<{utf8}>")[0] == utf8


@pytest.mark.parametrize(
    "params",
    ["=x", "SIZE=", "SÍZE=1", "SIZE=1 SIZE=2", "size=1 SIZE=2", "-X", "A_B", "SIZE==1",
     "SIZE=a=b", "X=\x01", "X=a\x85"],
)
def test_bad_parameter(params: str) -> None:
    for call, argument in ((parse_mail_from, "FROM:<a@b.c> "), (parse_rcpt_to, "TO:<u@d.c> ")):
        reply = reply_of(call, argument + params)
        assert (reply.code, reply.enhanced) == (501, "5.5.4")
        assert reply not in (MAIL_SYNTAX, RCPT_SYNTAX)


@given(st.text(max_size=40))
def test_parse_path_total(text: str) -> None:
    """Any argument parses or gets a 501 reply; a parsed address is clean."""
    for call, keyword in ((parse_mail_from, "FROM:"), (parse_rcpt_to, "TO:")):
        try:
            address, params = call(keyword + text)
        except SMTPReplyError as error:
            assert error.reply.code == 501
        else:
            assert len(address.encode()) <= 254
            assert not any(ord(c) < 32 or c in "<>" for c in address)
            assert all(key == key.upper() and key for key in params)


# replies


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply(250, "2.1.0", "Ok"), b"250 2.1.0 Ok\r\n"),
        (Reply(250, None, "Ok"), b"250 Ok\r\n"),
        (Reply(250, "2.0.0", ""), b"250 2.0.0\r\n"),
        (Reply(250, None, ""), b"250\r\n"),
        (Reply(354, None, "End data with <CR><LF>.<CR><LF>"),
         b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (Reply(550, "5.7.1", "no\nway\nJos\u00e9"),
         "550-5.7.1 no\r\n550-5.7.1 way\r\n550 5.7.1 Jos\u00e9\r\n".encode()),
        (Reply(250, None, "bridge.example\nPIPELINING\nSIZE 1000"),
         b"250-bridge.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"),
        (Reply(250, None, "a\n\nb"), b"250-a\r\n250-\r\n250 b\r\n"),
        (Reply(250, "2.0.0", "a\n"), b"250-2.0.0 a\r\n250 2.0.0\r\n"),
        (Reply(451, "4.3.0", "a\r\nb\rc"), b"451-4.3.0 a\r\n451 4.3.0 bc\r\n"),
    ],
)
def test_format_reply(reply: Reply, wire: bytes) -> None:
    assert format_reply(reply) == wire


def test_format_reply_rejects_bad_code() -> None:
    with pytest.raises(ValueError):
        format_reply(Reply(1000, None, "x"))


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("2.1.0 Ok", ("2.1.0", "Ok")),
        ("2.1.0    Ok", ("2.1.0", "Ok")),
        ("2.1.0", ("2.1.0", "")),
        ("5.7.139 Auth", ("5.7.139", "Auth")),
        ("Ok", (None, "Ok")),
        ("2.1.0x Ok", (None, "2.1.0x Ok")),
        ("6.0.0 Ok", (None, "6.0.0 Ok")),
        ("2.1000.0 Ok", (None, "2.1000.0 Ok")),
        ("2.1 Ok", (None, "2.1 Ok")),
    ],
)
def test_parse_enhanced(text: str, parsed: tuple[str | None, str]) -> None:
    assert parse_enhanced(text) == parsed


def feed_reply(parser: ReplyParser, *lines: bytes) -> Reply | None:
    """Feed all lines; only the last may complete the reply."""
    for line in lines[:-1]:
        assert parser.feed(line) is None
    return parser.feed(lines[-1])


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        ([b"250 2.1.0 Ok"], Reply(250, "2.1.0", "Ok")),
        ([b"250 Ok"], Reply(250, None, "Ok")),
        ([b"250"], Reply(250, None, "")),
        ([b"250 "], Reply(250, None, "")),
        ([b"250 2.0.0"], Reply(250, "2.0.0", "")),
        ([b"220 mx.example ESMTP"], Reply(220, None, "mx.example ESMTP")),
        ([b"250-mx.example", b"250-PIPELINING", b"250 8BITMIME"],
         Reply(250, None, "mx.example\nPIPELINING\n8BITMIME")),
        ([b"550-5.7.1 a", b"550-5.7.1 b", b"550 5.7.1 c"], Reply(550, "5.7.1", "a\nb\nc")),
        ([b"550-5.7.1 a", b"550-b", b"550 5.7.2 c"], Reply(550, "5.7.1", "a\nb\n5.7.2 c")),
        ([b"250-a", b"250-2.0.0 b", b"250 c"], Reply(250, None, "a\n2.0.0 b\nc")),
        ([b"250 5.0.0 mismatched class"], Reply(250, None, "5.0.0 mismatched class")),
        ([b"421 4.7.0 Try again later"], Reply(421, "4.7.0", "Try again later")),
        ([b"250-", b"250 x"], Reply(250, None, "\nx")),
        ([b"554 caf\xe9"], Reply(554, None, "caf\ufffd")),
    ],
)
def test_reply_parser(lines: list[bytes], reply: Reply) -> None:
    assert feed_reply(ReplyParser(), *lines) == reply


def test_reply_parser_successive_replies() -> None:
    parser = ReplyParser()
    assert feed_reply(parser, b"250-2.0.0 a", b"250 2.0.0 b") == Reply(250, "2.0.0", "a\nb")
    assert feed_reply(parser, b"354 go ahead") == Reply(354, None, "go ahead")


@pytest.mark.parametrize(
    "lines",
    [[b""], [b"hello"], [b"25 x"], [b"2500 x"], [b"250x"], [b"250_x"], [b" 250 x"],
     [b"abc def"], [b"100 x"], [b"600 x"], [b"250-a", b"251 b"], [b"250-a", b"garbage"]],
)
def test_reply_parser_garbage(lines: list[bytes]) -> None:
    parser = ReplyParser()
    with pytest.raises(ValueError):
        for line in lines:
            parser.feed(line)
    # The parser starts afresh after garbage.
    assert parser.feed(b"250 Ok") == Reply(250, None, "Ok")


reply_lines = st.from_regex(r"[A-Za-z\u00e9<][A-Za-z0-9 .,:;<>\u00e9-]*", fullmatch=True)


@given(
    st.integers(200, 599),
    st.booleans(),
    st.integers(0, 9),
    st.lists(reply_lines | st.just(""), min_size=1, max_size=5),
)
def test_format_then_parse(code: int, enhanced: bool, detail: int, lines: list[str]) -> None:
    """What format_reply sends, ReplyParser reads back."""
    klass = str(code)[0]
    enhanced_code = f"{klass}.0.{detail}" if enhanced and klass != "3" else None
    reply = Reply(code, enhanced_code, "\n".join(lines))
    wire = format_reply(reply)
    assert wire.endswith(b"\r\n")
    parser = ReplyParser()
    assert feed_reply(parser, *wire[:-2].split(b"\r\n")) == reply


# DATA codec


def reference_decode(
    data: bytes, accept_bare_lf_end: bool = False, limit: int = 998
) -> tuple[list[bytes], bytes | None]:
    """The DATA rules applied to the whole input at once, one line at a time."""
    lines: list[bytes] = []
    after_crlf = True
    position = 0
    while True:
        end = data.find(b"\n", position)
        if end < 0:
            return lines, None
        line = data[position:end]
        position = end + 1
        crlf = line.endswith(b"\r")
        if crlf:
            line = line[:-1]
        if line == b".":
            if accept_bare_lf_end or (crlf and after_crlf):
                return lines, data[position:]
        elif line.startswith(b"."):
            line = line[1:]
        line = line.replace(b"\r", b" ")
        while len(line) > limit:
            lines.append(line[:limit])
            line = b" " + line[limit:]
        lines.append(line)
        after_crlf = crlf


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed)."""
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    return [data[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]


def decode(
    chunks: list[bytes], accept_bare_lf_end: bool = False, limit: int = 998
) -> tuple[list[bytes], bytes | None]:
    """Feed ``chunks`` one by one; the lines, and everything after the end of data."""
    decoder = DataDecoder(accept_bare_lf_end=accept_bare_lf_end, max_line_length=limit)
    lines: list[bytes] = []
    for index, chunk in enumerate(chunks):
        got, rest = decoder.feed(chunk)
        lines.extend(got)
        if rest is not None:
            with pytest.raises(RuntimeError):
                decoder.feed(b"")
            return lines, rest + b"".join(chunks[index + 1 :])
    return lines, None


def test_end_of_data_constant() -> None:
    assert END_OF_DATA == b".\r\n"


@pytest.mark.parametrize(
    ("data", "lines", "rest"),
    [
        (b"a\r\nb\r\n.\r\n", [b"a", b"b"], b""),
        (b".\r\n", [], b""),
        (b".\r\nQUIT\r\n", [], b"QUIT\r\n"),
        (b"a\r\n.\r\nRSET\r\nQUIT\r\n", [b"a"], b"RSET\r\nQUIT\r\n"),
        (b"a\r\nb", [b"a"], None),
        (b"..x\r\n..\r\n...\r\n.\r\n", [b".x", b".", b".."], b""),
        (b"a\nb\r\n.\r\n", [b"a", b"b"], b""),
        (b"\r\n\r\n.\r\n", [b"", b""], b""),
        (b"a\n.\nb\r\n.\r\n", [b"a", b".", b"b"], b""),
        (b"a\n.\r\nb\r\n.\r\n", [b"a", b".", b"b"], b""),
        (b"a\r\n.\nb\r\n.\r\n", [b"a", b".", b"b"], b""),
        (b".\n.\r\n.\r\n", [b".", b"."], b""),
        (b"a\rb\r\n.\r\n", [b"a b"], b""),
        (b"a\r\r\n.\r\n", [b"a "], b""),
        (b"\r\r\r\n.\r\n", [b"  "], b""),
        (b"a\r.\r\n.\r\n", [b"a ."], b""),
        (b".\r.\r\n.\r\n", [b" ."], b""),
        (b".\rx\r\n.\r\n", [b" x"], b""),
    ],
)
def test_data_decoder(data: bytes, lines: list[bytes], rest: bytes | None) -> None:
    assert DataDecoder().feed(data) == (lines, rest)
    assert decode([data[i : i + 1] for i in range(len(data))]) == (lines, rest)


def test_data_decoder_end_across_chunks() -> None:
    decoder = DataDecoder()
    assert decoder.feed(b"a\r\n.") == ([b"a"], None)
    assert decoder.feed(b"\r") == ([], None)
    assert decoder.feed(b"\nQUIT") == ([], b"QUIT")
    with pytest.raises(RuntimeError):
        decoder.feed(b"x")


def test_data_decoder_cr_at_chunk_boundary() -> None:
    decoder = DataDecoder()
    assert decoder.feed(b"a\r") == ([], None)
    assert decoder.feed(b"\nb\r") == ([b"a"], None)
    assert decoder.feed(b"c\r\n.\r\n") == ([b"b c"], b"")


def test_data_decoder_accept_bare_lf_end() -> None:
    for data in (b"a\n.\nMAIL", b"a\r\n.\nMAIL", b"a\n.\r\nMAIL", b".\nMAIL"):
        lines, rest = DataDecoder(accept_bare_lf_end=True).feed(data)
        assert rest == b"MAIL"
        assert lines == reference_decode(data, accept_bare_lf_end=True)[0]


@pytest.mark.parametrize(
    ("data", "limit", "lines"),
    [
        (b"abcde\r\n", 5, [b"abcde"]),
        (b"abcdef\r\n", 5, [b"abcde", b" f"]),
        (b"abcdefghijkl\r\n", 5, [b"abcde", b" fghi", b" jkl"]),
        (b"abcdefghi\r\n", 5, [b"abcde", b" fghi"]),
        (b"..bcdef\r\n", 5, [b".bcde", b" f"]),
        (b"a\rcdef\r\n", 5, [b"a cde", b" f"]),
        (b"abcd\r\r\n", 5, [b"abcd "]),
        (b"abc\r\n", 2, [b"ab", b" c"]),
        (b"x" * 1000 + b"\r\n", 998, [b"x" * 998, b" xx"]),
    ],
)
def test_data_decoder_breaks_long_lines(data: bytes, limit: int, lines: list[bytes]) -> None:
    assert DataDecoder(max_line_length=limit).feed(data + b".\r\n") == (lines, b"")


def test_data_decoder_bounds_partial_line() -> None:
    """A line without end is emitted piece by piece instead of being held in memory."""
    limit = 10
    decoder = DataDecoder(max_line_length=limit)
    consumed = 0
    first = True
    for fed in range(7, 7001, 7):
        lines, rest = decoder.feed(b"x\rxxxxx")
        assert rest is None
        for line in lines:
            assert len(line) <= limit
            consumed += len(line) if first else len(line) - 1
            first = False
        assert fed - consumed <= limit + 2
    lines, rest = decoder.feed(b"\r\n.\r\n")
    assert rest == b""
    assert lines[-1].startswith(b" ")


def test_data_decoder_rejects_tiny_limit() -> None:
    with pytest.raises(ValueError):
        DataDecoder(max_line_length=1)


def test_encode_lines() -> None:
    assert encode_lines([]) == b""
    assert encode_lines([b""]) == b"\r\n"
    assert encode_lines([b"a", b".b", b".", b"", b"c."]) == b"a\r\n..b\r\n..\r\n\r\nc.\r\n"
    assert encode_lines(line for line in [b".", b"x"]) == b"..\r\nx\r\n"


@pytest.mark.parametrize("line", [b"a\rb", b"a\nb", b"\r", b"\n", b"a\r\n"])
def test_encode_lines_refuses_line_endings(line: bytes) -> None:
    with pytest.raises(ValueError):
        encode_lines([b"ok", line])


limits = st.sampled_from([2, 3, 5, 998])
# Body lines without CR or LF, often starting with dots or spaces.
body_lines = st.binary(max_size=12).map(
    lambda line: line.replace(b"\r", b"").replace(b"\n", b"")
) | st.lists(st.sampled_from([b".", b"a", b" ", b"\x00", b"\xff", b"\xc3\xa9"]), max_size=8).map(
    b"".join
)
cut_lists = st.lists(st.integers(min_value=0), max_size=8)
# Inputs rich in the bytes that matter: CR, LF, dots and line-sized runs.
smtpish = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"a", b" ", b"\r\n", b"\r\n.", b"\n.", b"..", b"xyzw"]),
    max_size=60,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    limits.flatmap(
        lambda limit: st.tuples(
            st.just(limit),
            st.lists(body_lines.filter(lambda line: len(line) <= limit), max_size=12),
        )
    ),
    cut_lists,
)
def test_round_trip(limit_and_lines: tuple[int, list[bytes]], cuts: list[int]) -> None:
    """Encoded body lines plus the end of data decode to the same lines, however chunked."""
    limit, lines = limit_and_lines
    data = encode_lines(lines) + END_OF_DATA
    assert decode(split_at(data, cuts), limit=limit) == (lines, b"")


def assert_safe(body: bytes, limit: int) -> None:
    """No bare CR or LF, no over-long line, and the end of data only at the end."""
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
    assert body.endswith(b"\r\n.\r\n") or body == END_OF_DATA
    assert body.find(b"\r\n.\r\n") in (len(body) - 5, -1)
    assert not body.startswith(b".\r\n") or body == END_OF_DATA
    for line in body.split(b"\r\n")[:-2]:
        # The dot added for transparency does not count (RFC 5321 4.5.3.1.6).
        unstuffed = line[1:] if line.startswith(b".") else line
        assert len(unstuffed) + 2 <= limit + 2


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200) | smtpish, cut_lists, limits, st.booleans())
def test_any_input_is_made_safe(
    data: bytes, cuts: list[int], limit: int, accept_bare_lf_end: bool
) -> None:
    """Whatever a client sends, what goes upstream is clean, and chunking changes nothing."""
    data += b"\r\n.\r\n"
    whole = decode([data], accept_bare_lf_end, limit)
    assert whole == reference_decode(data, accept_bare_lf_end, limit)
    assert decode(split_at(data, cuts), accept_bare_lf_end, limit) == whole
    lines, rest = whole
    assert rest is not None
    assert_safe(encode_lines(lines) + END_OF_DATA, limit)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"line", b".dot", b"", b"x" * 12]), max_size=30), cut_lists)
def test_crlf_bodies_match_reference(parts: list[bytes], cuts: list[int]) -> None:
    """Well-formed CRLF bodies, as most clients send them, decode by the same rules."""
    data = b"\r\n".join(parts) + b"\r\n.\r\n"
    expected = reference_decode(data, limit=10)
    assert decode(split_at(data, cuts), limit=10) == expected
    assert decode([data[i : i + 1] for i in range(len(data))], limit=10) == expected


SMUGGLING_VECTORS = [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r.\n"]
SMUGGLED = b"MAIL FROM:<evil@x.y>\r\nRCPT TO:<v@x.y>\r\nDATA\r\nspoofed\r\n"


@pytest.mark.parametrize("vector", SMUGGLING_VECTORS)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 1 << 16])
def test_smuggling_is_impossible(vector: bytes, chunk_size: int) -> None:
    data = b"Subject: x\r\n\r\nhello" + vector + SMUGGLED + b"\r\n.\r\n"
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    lines, rest = decode(chunks)
    assert rest == b""
    encoded = encode_lines(lines) + END_OF_DATA
    assert_safe(encoded, 998)
    assert encoded.index(b"MAIL FROM") < encoded.index(b"\r\n.\r\n") == len(encoded) - 5
    assert b"MAIL FROM:<evil@x.y>" in b"\n".join(lines)


def test_bare_lf_end_when_accepted() -> None:
    """With accept_bare_lf_end the legacy LF.LF ends the data; what follows is commands."""
    data = b"Subject: x\r\n\r\nhello\n.\n" + SMUGGLED + b"\r\n.\r\n"
    lines, rest = DataDecoder(accept_bare_lf_end=True).feed(data)
    assert lines == [b"Subject: x", b"", b"hello"]
    assert rest == SMUGGLED + b"\r\n.\r\n"


def test_reply_parser_limits_a_reply() -> None:
    parser = ReplyParser(max_lines=3, max_bytes=1000)
    assert feed_reply(parser, b"250-a", b"250-b", b"250 c") == Reply(250, None, "a\nb\nc")
    for line in (b"250-a", b"250-b", b"250-c"):
        assert parser.feed(line) is None
    with pytest.raises(ReplyTooLong):
        parser.feed(b"250 d")
    parser = ReplyParser(max_lines=100, max_bytes=1000)
    assert parser.feed(b"250-" + b"x" * 900) is None
    with pytest.raises(ReplyTooLong):
        parser.feed(b"250 " + b"y" * 200)
    assert parser.feed(b"250 fresh") == Reply(250, None, "fresh")  # the next reply starts anew
