"""Why a client's TLS handshake failed, in words an administrator can act on.

OpenSSL's reason ("unsupported protocol", "no shared cipher") says what went wrong
but not what the device wanted; the first bytes it sent (L{smtpbridge.clienthello})
say that, and often which setting of the bridge would serve it.  Failures are also
counted per listener and reason (L{HandshakeFailures}) for the metrics to read.

Pure: the session gathers the facts, this module turns them into words.
"""

from __future__ import annotations

from collections.abc import Set

import attr

from smtpbridge.clienthello import (
    SUITE_NAMES,
    VERSION_NAMES,
    ClientHello,
    Incomplete,
    NotAClientHello,
    parse_client_hello,
    plain_text_verb,
)

#: The reasons the bridge words itself (the others are OpenSSL's).
TIMEOUT = "handshake timeout"
CLOSED = "connection closed by the client"
PLAIN_TEXT = "plain text on an implicit-TLS listener"

#: Alerts by which a client says it does not accept the bridge's certificate.
_CERTIFICATE_ALERTS = ("alert unknown ca", "alert bad certificate",
                       "alert certificate unknown", "alert certificate expired",
                       "alert unsupported certificate", "alert certificate revoked")

#: The configuration's spelling of each version, by its code on the wire.
_SETTING = {0x0301: "1.0", 0x0302: "1.1", 0x0303: "1.2", 0x0304: "1.3"}
_FLOOR = {setting: code for code, setting in _SETTING.items()}


@attr.frozen
class ListenerTLS:
    """What the diagnosis needs to know of the listener."""

    name: str
    tls: str  # implicit | starttls
    min_tls_version: str  # "1.0" ... "1.3"


@attr.frozen
class Diagnosis:
    """A failed handshake, explained."""

    reason: str  # what failed: OpenSSL's reason or the bridge's words
    offer: str  # what the client sent, as a phrase: "client offered ...", "client sent ..."
    hint: str | None = None  # what to change, when the bridge could serve the client
    key: str = ""  # the reason it is counted under


def diagnose(first: bytes, reason: str, listener: ListenerTLS,
             available: Set[str]) -> Diagnosis:
    """Explain a failed handshake on C{listener}.

    C{first} holds the first bytes the client sent, C{reason} is OpenSSL's reason
    (or L{TIMEOUT}, L{CLOSED}), C{available} the names of the suites some setting
    of the bridge can serve.
    """
    verb = plain_text_verb(first)
    if verb is not None:
        if listener.tls != "implicit":
            return Diagnosis(reason, f'client sent "{verb}" in clear text after STARTTLS',
                             key=reason)
        return Diagnosis(reason, f'client sent "{verb}" in clear text', key=PLAIN_TEXT, hint=(
            f'client sent "{verb}" in clear text on an implicit-TLS listener: '
            "use the STARTTLS listener"))
    if not first:
        hint = None
        if reason == TIMEOUT and listener.tls == "implicit":
            hint = ("a plain-text SMTP client waits for a greeting, which an implicit-TLS "
                    "listener never sends: use the STARTTLS listener")
        return Diagnosis(reason, "client sent nothing", hint, key=reason)
    try:
        hello = parse_client_hello(first)
    except Incomplete:
        return Diagnosis(reason, f"client sent an incomplete ClientHello ({len(first)} bytes)",
                         key=reason)
    except NotAClientHello as e:
        return Diagnosis(reason, f"client sent no TLS ({e}; first bytes {first[:8].hex()})",
                         key=reason)
    offer = "client offered " + hello.describe()
    if hello.server_name:
        offer += f", server name {hello.server_name!r}"
    return Diagnosis(reason, offer, _hint(hello, reason, listener, available), key=reason)


def _hint(hello: ClientHello, reason: str, listener: ListenerTLS,
          available: Set[str]) -> str | None:
    """The setting that would serve C{hello}, or why none would."""
    names = hello.suite_names
    if names and all(suite in SUITE_NAMES for suite in hello.suites) and not (
            set(names) & set(available)):
        return ("none of the client's cipher suites is in the bridge's OpenSSL: "
                "see the README on 3DES-only devices (stunnel in front of a plain listener)")
    highest = hello.highest
    if highest is None:
        return "client offered no TLS version the bridge knows"
    if highest < 0x0301:
        return (f"client offered at most {VERSION_NAMES[highest]}, which no setting of the "
                "bridge serves")
    floor = _FLOOR[listener.min_tls_version]
    if highest < floor:
        return (f"client offered at most {VERSION_NAMES[highest]}: set min_tls_version = "
                f'"{_SETTING[highest]}" on listener "{listener.name}"')
    if "signature" in reason and hello.only_weak_signatures and floor >= 0x0303:
        return ('client accepts only SHA-1 signatures: set min_tls_version = "1.1" on '
                f'listener "{listener.name}", which allows them')
    if any(alert in reason for alert in _CERTIFICATE_ALERTS):
        asked = (f"it asked for {hello.server_name!r}" if hello.server_name
                 else "it sent no server name, so it may connect by IP address")
        return ("the client refused the bridge's certificate: the device must trust its "
                f"issuer and find in it the name or address it connects to ({asked})")
    return None


class HandshakeFailures:
    """Failed handshakes counted by listener and reason, for the metrics to read.

    One counter serves every listener of the bridge; C{counts} maps
    C{(listener, reason)} to the number of failures since the start.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def add(self, listener: str, reason: str) -> None:
        key = (listener, reason)
        self.counts[key] = self.counts.get(key, 0) + 1

    def total(self, listener: str | None = None) -> int:
        """Failures on C{listener}, or on all of them."""
        return sum(count for (name, _), count in self.counts.items()
                   if listener is None or name == listener)
