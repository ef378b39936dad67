"""The ClientHello reader and the handshake diagnosis, on hellos captured from real clients
(L{tests.client_hellos})."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpbridge.clienthello import (
    SUITE_NAMES,
    ClientHello,
    Incomplete,
    NotAClientHello,
    parse_client_hello,
    plain_text_verb,
)
from smtpbridge.handshake import (
    CLOSED,
    PLAIN_TEXT,
    TIMEOUT,
    HandshakeFailures,
    ListenerTLS,
    diagnose,
)
from smtpbridge.tls import legacy_cipher_names
from tests import client_hellos

SMTPS = ListenerTLS("smtps", "implicit", "1.2")
LEGACY = ListenerTLS("legacy465", "implicit", "1.0")
AVAILABLE = legacy_cipher_names()


def test_a_current_client_offers_tls_1_3_to_1_0():
    hello = parse_client_hello(client_hellos.DEFAULT)
    assert hello.versions == (0x0304, 0x0303, 0x0302, 0x0301)
    assert hello.highest == 0x0304 and len(hello.suites) == 30
    assert hello.suite_names[:3] == ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                                     "TLS_AES_128_GCM_SHA256"]
    assert 0x00FF not in hello.suites  # the renegotiation SCSV is no suite
    assert hello.server_name is None and not hello.sslv2_format
    assert hello.describe() == (
        "TLS 1.3 at most, 30 cipher suites (TLS 1.3, ECDHE, DHE, RSA): TLS_AES_256_GCM_SHA384, "
        "TLS_CHACHA20_POLY1305_SHA256, TLS_AES_128_GCM_SHA256, ECDHE-ECDSA-AES256-GCM-SHA384, "
        "ECDHE-RSA-AES256-GCM-SHA384 and 25 more")


def test_a_tls_1_0_device():
    hello = parse_client_hello(client_hellos.TLS1)
    assert hello.versions == (0x0301,)
    assert hello.suite_names == [
        "ECDHE-ECDSA-AES256-SHA", "ECDHE-RSA-AES256-SHA", "DHE-RSA-AES256-SHA",
        "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA", "DHE-RSA-AES128-SHA", "AES256-SHA",
        "AES128-SHA"]
    assert parse_client_hello(client_hellos.TLS1_AES128).describe() == (
        "TLS 1.0 at most, 1 cipher suite: AES128-SHA")


def test_dhe_only_tls_1_3_only_and_a_server_name():
    assert parse_client_hello(client_hellos.DHE_ONLY).describe() == (
        "TLS 1.2 at most, 1 cipher suite: DHE-RSA-AES128-SHA")
    tls13 = parse_client_hello(client_hellos.TLS13)
    assert tls13.versions == (0x0304,) and tls13.highest == 0x0304
    assert parse_client_hello(client_hellos.SNI).server_name == "printer.example"


def test_sha1_signatures_only():
    hello = parse_client_hello(client_hellos.SHA1_SIGNATURES)
    assert hello.signatures == (0x0201,) and hello.only_weak_signatures
    assert hello.describe().endswith(", SHA-1 signatures only")
    assert not parse_client_hello(client_hellos.DEFAULT).only_weak_signatures


def test_an_sslv2_format_hello():
    """The SSLv2-compatible hello of very old stacks: TLS suites are those starting 0x00."""
    specs = bytes.fromhex("00002f" "010080" "00000a")
    message = (b"\x01\x03\x01" + len(specs).to_bytes(2, "big") + b"\x00\x00\x00\x10" + specs
               + b"c" * 16)
    hello = parse_client_hello(bytes([0x80 | len(message) >> 8, len(message) & 0xFF]) + message)
    assert hello.sslv2_format and hello.versions == (0x0301,)
    assert hello.suite_names == ["AES128-SHA", "DES-CBC3-SHA"]
    assert hello.describe().endswith(", in an SSLv2-format hello")


def test_every_prefix_of_a_hello_is_incomplete_and_the_hello_may_span_records():
    data = client_hellos.DEFAULT
    for end in range(len(data)):
        with pytest.raises(Incomplete):
            parse_client_hello(data[:end])
    # The same hello in two records of one handshake message.
    message = data[5:]
    split = (b"\x16\x03\x01" + (100).to_bytes(2, "big") + message[:100]
             + b"\x16\x03\x01" + (len(message) - 100).to_bytes(2, "big") + message[100:])
    assert parse_client_hello(split) == parse_client_hello(data)


def test_what_is_no_client_hello():
    for data in (b"EHLO printer\r\n", b"\x17\x03\x03\x00\x05hello",
                 b"\x16\x03\x03\x00\x04\x02\x00\x00\x00"):  # a ServerHello
        with pytest.raises(NotAClientHello):
            parse_client_hello(data)
    broken = bytearray(client_hellos.TLS1_AES128)
    broken[44:46] = b"\x40\x00"  # a cipher suite list longer than the message
    with pytest.raises(NotAClientHello):
        parse_client_hello(bytes(broken))


@given(st.binary(max_size=300))
def test_any_bytes_give_a_hello_or_one_of_two_errors(data):
    try:
        hello = parse_client_hello(data)
    except (Incomplete, NotAClientHello):
        return
    assert isinstance(hello, ClientHello)
    hello.describe()


@pytest.mark.parametrize(("data", "verb"), [
    (b"EHLO printer.example\r\n", "EHLO"), (b"helo x\r\n", "helo"), (b"QUIT\r\n", "QUIT"),
    (b"GET / HTTP/1.1\r\n", "GET"), (b"\x16\x03\x01", None), (b"", None),
    (b"EHLOEHLOEHLO\r\n", None), (b"EH\xffLO", None)])
def test_plain_text_verbs(data, verb):
    assert plain_text_verb(data) == verb


def test_the_suite_table_names_suites_as_openssl_does():
    """Every suite the bridge can serve at its lowest setting has its OpenSSL name in the
    table (except PSK and SRP suites, which no mail client offers)."""
    missing = {name for name in AVAILABLE if "PSK" not in name and "SRP" not in name
               and "ARIA" not in name and "CCM" not in name} - set(SUITE_NAMES.values())
    assert missing == set()


# The diagnosis.

def test_a_version_below_the_floor_names_the_setting():
    diagnosis = diagnose(client_hellos.TLS1, "unsupported protocol", SMTPS, AVAILABLE)
    assert diagnosis.offer.startswith("client offered TLS 1.0 at most, 8 cipher suites")
    assert diagnosis.hint == ('client offered at most TLS 1.0: set min_tls_version = "1.0" '
                              'on listener "smtps"')
    assert diagnosis.key == "unsupported protocol"


def test_3des_only_is_what_no_setting_serves():
    hello = client_hellos.TLS1_AES128.replace(b"\x00\x04\x00\x2f\x00\xff",
                                              b"\x00\x04\x00\x0a\x00\xff", 1)
    diagnosis = diagnose(hello, "no shared cipher", SMTPS, AVAILABLE)
    assert diagnosis.offer == "client offered TLS 1.0 at most, 1 cipher suite: DES-CBC3-SHA"
    assert diagnosis.hint is not None and diagnosis.hint.startswith(
        "none of the client's cipher suites is in the bridge's OpenSSL")
    # A suite the table does not know might be served: no such claim then.
    unknown = hello.replace(b"\x00\x04\x00\x0a\x00\xff", b"\x00\x04\xfe\xfe\x00\xff", 1)
    assert diagnose(unknown, "no shared cipher", LEGACY, AVAILABLE).hint is None


def test_plain_text_and_silence():
    plain = diagnose(b"EHLO printer\r\n", "wrong version number", SMTPS, AVAILABLE)
    assert (plain.key, plain.offer) == (PLAIN_TEXT, 'client sent "EHLO" in clear text')
    assert plain.hint == ('client sent "EHLO" in clear text on an implicit-TLS listener: use '
                          "the STARTTLS listener")
    starttls = ListenerTLS("legacy", "starttls", "1.2")
    assert diagnose(b"MAIL FROM:<a@b>\r\n", "wrong version number", starttls,
                    AVAILABLE).hint is None
    silent = diagnose(b"", TIMEOUT, SMTPS, AVAILABLE)
    assert silent.offer == "client sent nothing" and "waits for a greeting" in (silent.hint or "")
    assert diagnose(b"", TIMEOUT, starttls, AVAILABLE).hint is None
    partial = diagnose(client_hellos.DEFAULT[:40], CLOSED, SMTPS, AVAILABLE)
    assert partial.offer == "client sent an incomplete ClientHello (40 bytes)"
    binary = diagnose(b"\x00\x01\x02\x03", "wrong version number", SMTPS, AVAILABLE)
    assert binary.offer.startswith("client sent no TLS (") and "00010203" in binary.offer


def test_sha1_signatures_ssl_3_and_a_refused_certificate():
    sha1 = diagnose(client_hellos.SHA1_SIGNATURES, "no shared signature algorithms", SMTPS,
                    AVAILABLE)
    assert sha1.hint == ('client accepts only SHA-1 signatures: set min_tls_version = "1.1" '
                         'on listener "smtps", which allows them')
    assert diagnose(client_hellos.SHA1_SIGNATURES, "no shared signature algorithms", LEGACY,
                    AVAILABLE).hint is None
    ssl3 = client_hellos.TLS1_AES128[:9] + b"\x03\x00" + client_hellos.TLS1_AES128[11:]
    assert diagnose(ssl3, "unsupported protocol", LEGACY, AVAILABLE).hint == (
        "client offered at most SSL 3.0, which no setting of the bridge serves")
    refused = diagnose(client_hellos.SNI, "tlsv1 alert unknown ca", SMTPS, AVAILABLE)
    assert refused.offer.endswith(", server name 'printer.example'")
    assert refused.hint is not None and refused.hint.startswith(
        "the client refused the bridge's certificate") and "'printer.example'" in refused.hint


def test_failures_are_counted_by_listener_and_reason():
    failures = HandshakeFailures()
    failures.add("smtps", "unsupported protocol")
    failures.add("smtps", "unsupported protocol")
    failures.add("legacy", PLAIN_TEXT)
    assert failures.counts == {("smtps", "unsupported protocol"): 2, ("legacy", PLAIN_TEXT): 1}
    assert (failures.total(), failures.total("smtps"), failures.total("none")) == (3, 2, 0)

