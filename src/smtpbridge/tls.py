"""TLS for both sides: server contexts for listeners, verifying client options for the
upstream, the demo's self-signed certificate.

Server contexts are built with pyOpenSSL directly, because Twisted's
``CertificateOptions`` cannot allow TLS 1.0/1.1 with the security level old
devices need.  They carry the RFC 7919 ffdhe2048 group, so that clients that know
only DHE key exchange are served, and their connections keep the first bytes a
client sends until the handshake is over, so that a failed one can be explained.
"""

from __future__ import annotations

import base64
import datetime
import functools
import importlib.resources
import ipaddress
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator as TLSOptions
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpbridge.errors import ConfigError
from smtpbridge.model import TLS_VERSIONS, UPSTREAM_TLS_VERSIONS, Route

#: OpenSSL's and Twisted's names for the versions the configuration spells "1.0" ... "1.3".
_OPENSSL_VERSIONS = dict(zip(TLS_VERSIONS, (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION,
                                            SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION),
                             strict=True))
_TWISTED_VERSIONS = {version: TLSVersion.lookupByName("TLSv" + version.replace(".", "_"))
                     for version in UPSTREAM_TLS_VERSIONS}

#: The suites of listeners that allow TLS 1.0 or 1.1: old devices offer only SHA-1
#: signatures and CBC suites, which OpenSSL 3 refuses above security level 0.
LEGACY_CIPHERS = b"DEFAULT:@SECLEVEL=0"

#: Bytes of a client's first flight kept for explaining a failed handshake: a
#: ClientHello fits one record (16 KiB and its header) in practice.
KEEP_FIRST_BYTES = 16 * 1024 + 5


def server_context(certificate: str, key: str, min_version: str = "1.2",
                   config_file: str = "", key_name: str = "tls",
                   client_certificates: str = "none", client_ca: str | None = None,
                   client_ca_key: str = "client_ca") -> SSL.Context:
    """An OpenSSL server context with our certificate, allowing C{min_version} and up.

    C{client_certificates} "request" or "require" asks clients for a certificate
    issued by a CA of the C{client_ca} bundle.  Unreadable or mismatched files
    raise L{ConfigError} naming C{key_name}.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(_OPENSSL_VERSIONS[min_version])
    if min_version in ("1.0", "1.1"):
        context.set_cipher_list(LEGACY_CIPHERS)
    _load_dh_group(context)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                        | SSL.OP_NO_RENEGOTIATION)
    # An idle session gives back its read and write buffers (about 34 KiB), so a
    # thousand devices that keep their connection open cost far less.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    for name, path in (("certificate", certificate), ("key", key)):
        if not os.access(path, os.R_OK):
            reason = "does not exist" if not os.path.exists(path) else "is not readable"
            raise ConfigError(config_file, f"{key_name}.{name}", f"{path} {reason}")
    try:
        context.use_certificate_chain_file(certificate)
    except SSL.Error:
        raise ConfigError(config_file, f"{key_name}.certificate",
                          f"{certificate} holds no usable PEM certificate")
    try:
        context.use_privatekey_file(key)
        context.check_privatekey()
    except SSL.Error:
        raise ConfigError(config_file, f"{key_name}.key",
                          f"{key} holds no usable PEM private key for the certificate")
    if client_certificates != "none":
        try:
            context.load_verify_locations(client_ca)
        except SSL.Error:
            raise ConfigError(config_file, client_ca_key, f"{client_ca} holds no usable "
                                                        "PEM CA certificate")
        mode = SSL.VERIFY_PEER
        if client_certificates == "require":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(mode, None)
        context.set_session_id(b"smtpbridge")
    return context


def _load_dh_group(context: SSL.Context) -> None:
    """Give C{context} the RFC 7919 ffdhe2048 group for DHE key exchange.

    Without DH parameters OpenSSL offers no DHE suite, and a device that knows no
    other key exchange fails with "no shared cipher".  A published group, not
    generated parameters: nothing to make at start, nothing weak to audit.
    """
    group = importlib.resources.files(__package__).joinpath("ffdhe2048.pem")
    with importlib.resources.as_file(group) as path:
        context.load_tmp_dh(str(path))


@functools.cache
def legacy_cipher_names() -> frozenset[str]:
    """OpenSSL's names of every suite a listener can serve at its lowest setting
    (C{min_tls_version = "1.0"}): what a device may ask for and still be served."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_VERSION)
    context.set_cipher_list(LEGACY_CIPHERS)
    _load_dh_group(context)
    return frozenset(SSL.Connection(context, None).get_cipher_list())


class _ServerConnection(SSL.Connection):
    """A server connection that keeps the first bytes its client sends, until the
    handshake is over: what a failed handshake's client offered."""

    def __init__(self, context: SSL.Context) -> None:
        super().__init__(context, None)
        self.first_bytes: bytearray | None = bytearray()

    def bio_write(self, buf: bytes | bytearray | memoryview) -> int:
        kept = self.first_bytes
        if kept is not None and len(kept) < KEEP_FIRST_BYTES:
            kept += bytes(buf[:KEEP_FIRST_BYTES - len(kept)])
        return super().bio_write(buf)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Makes server-side TLS connections from a context that can be replaced at run time."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802
        return _ServerConnection(self.context)


def client_first_bytes(transport: object) -> bytes:
    """The first bytes the client of a server TLS transport sent (empty once the handshake
    is over, or without TLS)."""
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle else None
    if not isinstance(handle, _ServerConnection) or handle.first_bytes is None:
        return b""
    return bytes(handle.first_bytes)


def forget_first_bytes(transport: object) -> None:
    """The handshake is over: the connection need not keep the client's first bytes."""
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle else None
    if isinstance(handle, _ServerConnection):
        handle.first_bytes = None


def connection_summary(transport: object) -> tuple[str | None, str | None]:
    """The TLS version and cipher of a transport, or (None, None) without TLS."""
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle else None
    if not isinstance(handle, SSL.Connection):
        return None, None
    return handle.get_protocol_version_name(), handle.get_cipher_name()


def peer_fingerprint(transport: object) -> str | None:
    """The SHA-256 fingerprint (lower-case hex) of the peer's TLS certificate, if it sent one."""
    get_certificate = getattr(transport, "getPeerCertificate", None)
    certificate = get_certificate() if get_certificate else None
    if certificate is None:
        return None
    fingerprint: bytes = certificate.to_cryptography().fingerprint(hashes.SHA256())
    return fingerprint.hex()


def create_self_signed(certificate: str, key: str, hostname: str,
                       names: Sequence[str] = ()) -> None:
    """Write an RSA 2048 self-signed certificate for C{hostname}, localhost, 127.0.0.1, ::1
    and each of C{names}: host names or IP addresses (for devices that connect by address).

    RSA, because many old devices cannot do ECDSA.
    """
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    subject_names: list[x509.GeneralName] = []
    for entry in dict.fromkeys([hostname, "localhost", "127.0.0.1", "::1", *names]):
        try:
            subject_names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            subject_names.append(x509.DNSName(entry))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(subject_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    for path in (certificate, key):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    key_bytes = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    with open(certificate, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def load_certificates(path: str) -> list[Certificate]:
    """Every certificate of a PEM bundle; ValueError when it holds none."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path} holds no PEM certificate") from None
    return [Certificate(crypto.X509.from_cryptography(c)) for c in certificates]


def upstream_tls_options(route: Route) -> TLSOptions:
    """Client options that verify the upstream's certificate for C{route.host} (and send
    it as SNI when it is a DNS name), with TLS 1.2 or newer.

    The trust root is the system store, or the PEM bundle of C{route.ca_certificates}.
    """
    if route.ca_certificates is None:
        trust = platformTrust()
    else:
        trust = trustRootFromCertificates(load_certificates(route.ca_certificates))
    minimum = _TWISTED_VERSIONS[route.min_tls_version]
    return optionsForClientTLS(route.host, trustRoot=trust,
                               extraCertificateOptions={"raiseMinimumTo": minimum})


def public_key_pin(certificate: crypto.X509) -> str:
    """The pin of a certificate's public key: base64 of the SHA-256 of its SubjectPublicKeyInfo.

    The same value as ``openssl x509 -pubkey -noout | openssl pkey -pubin -outform der |
    openssl dgst -sha256 -binary | base64``.
    """
    key = certificate.to_cryptography().public_key()
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return base64.b64encode(digest.finalize()).decode("ascii")


def tls_failure_reason(reason: Failure, host: str) -> str:
    """Readable words for a failed handshake or certificate check."""
    if reason.check(VerificationError):
        return f"certificate does not match host {host}"
    args = reason.value.args if reason.value is not None else ()
    errors = args[0] if args and isinstance(args[0], list) else []
    words = [e[-1] for e in errors if isinstance(e, tuple) and e and e[-1]]
    return "; ".join(dict.fromkeys(words)) or reason.getErrorMessage() or "handshake failed"
