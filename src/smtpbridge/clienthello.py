"""What a TLS client offers, read from the first bytes it sends (its ClientHello).

When a device's handshake fails, OpenSSL names the reason but not what the device
asked for; the ClientHello says it: the TLS versions (``legacy_version``, or the
``supported_versions`` extension of TLS 1.3 clients), the cipher suites in the
client's order, the signature algorithms and the server name.  Old devices may still
send the SSLv2-compatible form of the hello, which is read too.

Pure: bytes in, values out.  Nothing a client chose reaches a log line except
through L{ClientHello.server_name} (kept to printable ASCII) and the suite names of
this module's own table.
"""

from __future__ import annotations

import attr

#: The versions by their code on the wire.
VERSION_NAMES = {0x0002: "SSL 2.0", 0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1",
                 0x0303: "TLS 1.2", 0x0304: "TLS 1.3"}

#: OpenSSL's names of the suites that devices and current clients send (from
#: ``openssl ciphers -V``, plus what today's OpenSSL has dropped: 3DES, RC4, DES,
#: export and NULL suites).  PSK and SRP suites, which no mail client offers, are left out.
_SUITES = """
0001 NULL-MD5 0002 NULL-SHA 0003 EXP-RC4-MD5 0004 RC4-MD5 0005 RC4-SHA 0006 EXP-RC2-CBC-MD5
0007 IDEA-CBC-SHA 0008 EXP-DES-CBC-SHA 0009 DES-CBC-SHA 000A DES-CBC3-SHA
0011 EXP-EDH-DSS-DES-CBC-SHA 0012 EDH-DSS-DES-CBC-SHA 0013 EDH-DSS-DES-CBC3-SHA
0014 EXP-EDH-RSA-DES-CBC-SHA 0015 EDH-RSA-DES-CBC-SHA 0016 EDH-RSA-DES-CBC3-SHA
0018 ADH-RC4-MD5 001B ADH-DES-CBC3-SHA 002F AES128-SHA 0032 DHE-DSS-AES128-SHA
0033 DHE-RSA-AES128-SHA 0034 ADH-AES128-SHA 0035 AES256-SHA 0038 DHE-DSS-AES256-SHA
0039 DHE-RSA-AES256-SHA 003A ADH-AES256-SHA 003B NULL-SHA256 003C AES128-SHA256
003D AES256-SHA256 0040 DHE-DSS-AES128-SHA256 0041 CAMELLIA128-SHA
0044 DHE-DSS-CAMELLIA128-SHA 0045 DHE-RSA-CAMELLIA128-SHA 0062 EXP1024-DES-CBC-SHA
0064 EXP1024-RC4-SHA 0066 DHE-DSS-RC4-SHA 0067 DHE-RSA-AES128-SHA256
006A DHE-DSS-AES256-SHA256 006B DHE-RSA-AES256-SHA256 0084 CAMELLIA256-SHA
0087 DHE-DSS-CAMELLIA256-SHA 0088 DHE-RSA-CAMELLIA256-SHA 0096 SEED-SHA
0099 DHE-DSS-SEED-SHA 009A DHE-RSA-SEED-SHA 009C AES128-GCM-SHA256 009D AES256-GCM-SHA384
009E DHE-RSA-AES128-GCM-SHA256 009F DHE-RSA-AES256-GCM-SHA384 00A2 DHE-DSS-AES128-GCM-SHA256
00A3 DHE-DSS-AES256-GCM-SHA384 00BA CAMELLIA128-SHA256 00BE DHE-RSA-CAMELLIA128-SHA256
00C0 CAMELLIA256-SHA256 00C4 DHE-RSA-CAMELLIA256-SHA256 1301 TLS_AES_128_GCM_SHA256
1302 TLS_AES_256_GCM_SHA384 1303 TLS_CHACHA20_POLY1305_SHA256 1304 TLS_AES_128_CCM_SHA256
1305 TLS_AES_128_CCM_8_SHA256 C007 ECDHE-ECDSA-RC4-SHA C008 ECDHE-ECDSA-DES-CBC3-SHA
C009 ECDHE-ECDSA-AES128-SHA C00A ECDHE-ECDSA-AES256-SHA C011 ECDHE-RSA-RC4-SHA
C012 ECDHE-RSA-DES-CBC3-SHA C013 ECDHE-RSA-AES128-SHA C014 ECDHE-RSA-AES256-SHA
C023 ECDHE-ECDSA-AES128-SHA256 C024 ECDHE-ECDSA-AES256-SHA384 C027 ECDHE-RSA-AES128-SHA256
C028 ECDHE-RSA-AES256-SHA384 C02B ECDHE-ECDSA-AES128-GCM-SHA256
C02C ECDHE-ECDSA-AES256-GCM-SHA384 C02F ECDHE-RSA-AES128-GCM-SHA256
C030 ECDHE-RSA-AES256-GCM-SHA384 C050 ARIA128-GCM-SHA256 C051 ARIA256-GCM-SHA384
C072 ECDHE-ECDSA-CAMELLIA128-SHA256 C073 ECDHE-ECDSA-CAMELLIA256-SHA384
C076 ECDHE-RSA-CAMELLIA128-SHA256 C077 ECDHE-RSA-CAMELLIA256-SHA384 C09C AES128-CCM
C09D AES256-CCM C09E DHE-RSA-AES128-CCM C09F DHE-RSA-AES256-CCM C0AC ECDHE-ECDSA-AES128-CCM
C0AD ECDHE-ECDSA-AES256-CCM CCA8 ECDHE-RSA-CHACHA20-POLY1305
CCA9 ECDHE-ECDSA-CHACHA20-POLY1305 CCAA DHE-RSA-CHACHA20-POLY1305
""".split()
SUITE_NAMES: dict[int, str] = {int(code, 16): name
                               for code, name in zip(_SUITES[::2], _SUITES[1::2], strict=True)}

#: Signaling values that are not suites: the renegotiation and fallback SCSVs.
_SIGNALS = frozenset({0x00FF, 0x5600})

#: Signature algorithms (TLS 1.2 ``signature_algorithms``) that use SHA-1 or MD5.
_WEAK_SIGNATURES = frozenset({0x0101, 0x0102, 0x0103, 0x0201, 0x0202, 0x0203})

_RECORD_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_EXT_SIGNATURE_ALGORITHMS = 0x000D
_EXT_SUPPORTED_VERSIONS = 0x002B
_SHOWN_SUITES = 5  # suites named in a description; the rest are counted
_MAX_NAME = 255


class NotAClientHello(ValueError):
    """The bytes are not (the start of) a TLS ClientHello."""


class Incomplete(ValueError):
    """The bytes are the start of a ClientHello, but not all of it."""


@attr.frozen
class ClientHello:
    """What a client offered in its ClientHello."""

    versions: tuple[int, ...]  # wire codes, from supported_versions if sent
    suites: tuple[int, ...]  # in the client's order, without signaling values and GREASE
    signatures: tuple[int, ...] = ()  # signature_algorithms, if sent
    server_name: str | None = None  # the SNI host name, if sent
    sslv2_format: bool = False  # the SSLv2-compatible hello of very old stacks

    @property
    def highest(self) -> int | None:
        """The newest version offered that this module knows, or None."""
        known = [version for version in self.versions if version in VERSION_NAMES]
        return max(known) if known else None

    @property
    def suite_names(self) -> list[str]:
        """The suites by OpenSSL's names; unknown codes as ``0xC0DE``."""
        return [suite_name(suite) for suite in self.suites]

    @property
    def only_weak_signatures(self) -> bool:
        """The client signs (and accepts signatures) with SHA-1 or MD5 only."""
        return bool(self.signatures) and set(self.signatures) <= _WEAK_SIGNATURES

    def describe(self) -> str:
        """A short summary for a log line: the newest version and the suites offered."""
        highest = self.highest
        version = VERSION_NAMES[highest] if highest is not None else "no known TLS version"
        names = self.suite_names
        count = f"{len(names)} cipher suite{'' if len(names) == 1 else 's'}"
        families = list(dict.fromkeys(key_exchange(name) for name in names))
        if len(families) > 1:
            count += f" ({', '.join(families)})"
        shown = ", ".join(names[:_SHOWN_SUITES])
        more = len(names) - _SHOWN_SUITES
        words = f"{version} at most, {count}" + (f": {shown}" if shown else "")
        words += f" and {more} more" if more > 0 else ""
        if self.only_weak_signatures:
            words += ", SHA-1 signatures only"
        if self.sslv2_format:
            words += ", in an SSLv2-format hello"
        return words


def suite_name(code: int) -> str:
    """OpenSSL's name of a cipher suite, or its code as ``0x002F``."""
    return SUITE_NAMES.get(code) or f"0x{code:04X}"


def key_exchange(name: str) -> str:
    """The key exchange family of a suite, by its OpenSSL name."""
    for prefix, family in (("TLS_", "TLS 1.3"), ("ECDHE-", "ECDHE"), ("DHE-", "DHE"),
                           ("EDH-", "DHE"), ("EXP-EDH-", "DHE"), ("ADH-", "anonymous"),
                           ("0x", "other")):
        if name.startswith(prefix):
            return family
    return "RSA"


def plain_text_verb(data: bytes) -> str | None:
    """The first word of C{data} if it starts like a plain-text command (``EHLO``,
    ``HELO``, ``GET``): letters only, at most ten, followed by a blank or a line end."""
    word = data[:11].split(maxsplit=1)[0] if data[:11].strip() else b""
    if not (word.isascii() and word.isalpha() and len(word) <= 10):
        return None
    rest = data[len(word):len(word) + 1]
    return word.decode("ascii") if rest in (b"", b" ", b"\r", b"\n", b"\t") else None


def parse_client_hello(data: bytes) -> ClientHello:
    """The ClientHello at the start of C{data} (the first bytes a client sent).

    Raises L{Incomplete} when C{data} holds only its start, and L{NotAClientHello}
    when C{data} is something else.
    """
    if not data:
        raise Incomplete("nothing received")
    if data[0] & 0x80:
        return _sslv2_hello(data)
    if data[0] != _RECORD_HANDSHAKE:
        raise NotAClientHello(f"first byte 0x{data[0]:02x} starts no TLS handshake record")
    body = _handshake_message(data)
    reader = _Reader(body[4:])
    legacy_version = reader.u16()
    reader.take(32)  # random
    reader.vector(1)  # legacy_session_id
    suites = _Reader(reader.vector(2))
    codes = [suites.u16() for _ in range(len(suites.data) // 2)]
    reader.vector(1)  # legacy_compression_methods
    versions: tuple[int, ...] = (legacy_version,)
    signatures: tuple[int, ...] = ()
    server_name = None
    extensions = _Reader(reader.vector(2) if reader.left else b"")
    while extensions.left:
        kind, value = extensions.u16(), _Reader(extensions.vector(2))
        if kind == _EXT_SUPPORTED_VERSIONS:
            listed = _Reader(value.vector(1))
            versions = tuple(listed.u16() for _ in range(len(listed.data) // 2))
        elif kind == _EXT_SIGNATURE_ALGORITHMS:
            listed = _Reader(value.vector(2))
            signatures = tuple(listed.u16() for _ in range(len(listed.data) // 2))
        elif kind == _EXT_SERVER_NAME:
            server_name = _server_name(value)
    return ClientHello(tuple(v for v in versions if not _grease(v)), _real_suites(codes),
                       signatures, server_name)


def _handshake_message(data: bytes) -> bytes:
    """The first handshake message, gathered from as many records as it spans."""
    body, position = b"", 0
    while len(body) < 4 or len(body) < 4 + int.from_bytes(body[1:4], "big"):
        header = data[position:position + 5]
        if len(header) < 5:
            raise Incomplete(f"{len(data)} bytes of a ClientHello")
        if header[0] != _RECORD_HANDSHAKE or header[1] != 0x03:
            raise NotAClientHello("the record is not a TLS handshake record")
        length = int.from_bytes(header[3:5], "big")
        body += data[position + 5:position + 5 + length]
        position += 5 + length
        if len(body) >= 1 and body[0] != _CLIENT_HELLO:
            raise NotAClientHello(f"handshake message {body[0]} is not a ClientHello")
    return body


def _sslv2_hello(data: bytes) -> ClientHello:
    """The SSLv2-compatible ClientHello (RFC 5246 appendix E.2)."""
    if len(data) < 2:
        raise Incomplete("an SSLv2 record header")
    length = ((data[0] & 0x7F) << 8) | data[1]
    if len(data) < 2 + length:
        raise Incomplete(f"{len(data)} bytes of an SSLv2 hello")
    reader = _Reader(data[2:2 + length])
    if reader.u8() != _CLIENT_HELLO:
        raise NotAClientHello("an SSLv2 record that is not a ClientHello")
    version, specs_length = reader.u16(), reader.u16()
    reader.take(4)  # session id and challenge lengths
    specs = reader.take(specs_length)
    codes = [int.from_bytes(specs[i + 1:i + 3], "big")
             for i in range(0, len(specs) - 2, 3) if specs[i] == 0]
    return ClientHello((version,), _real_suites(codes), sslv2_format=True)


def _server_name(value: _Reader) -> str | None:
    names = _Reader(value.vector(2))
    while names.left:
        kind, name = names.u8(), names.vector(2)
        if kind == 0:
            text = name[:_MAX_NAME].decode("ascii", "replace")
            return "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
    return None


def _grease(code: int) -> bool:
    """RFC 8701's reserved values (0x0A0A, 0x1A1A, ...), sent to keep servers tolerant."""
    return code & 0x0F0F == 0x0A0A and code >> 8 == code & 0xFF


def _real_suites(codes: list[int]) -> tuple[int, ...]:
    return tuple(code for code in codes if code not in _SIGNALS and not _grease(code))


class _Reader:
    """Reads big-endian integers and length-prefixed vectors; short data is malformed."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._at = 0

    @property
    def left(self) -> int:
        return len(self.data) - self._at

    def take(self, count: int) -> bytes:
        if count > self.left:
            raise NotAClientHello("a malformed ClientHello")
        chunk = self.data[self._at:self._at + count]
        self._at += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(length_bytes), "big"))
