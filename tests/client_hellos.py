"""ClientHellos captured from OpenSSL 3.0's ``openssl s_client`` (Debian 12): the first
bytes each command sent to a listening socket, for the unit tests of
L{smtpbridge.clienthello}.  Connecting to 127.0.0.1, s_client sends no server name
unless told."""

from __future__ import annotations

import base64

# TLS 1.3, 1.2, 1.1 and 1.0 offered (supported_versions), 30 suites:
# openssl s_client -connect 127.0.0.1:PORT
DEFAULT = base64.b64decode(
    "FgMBASQBAAEgAwOMqM9gOm1YJDiV88LE+ziM/IOzgRTc6xrd9qp49ySf/SDSmhA8svKD2M2kzwnk6rXdklUQ"
    "zWv6uTCILIZ+37hnSAA+EwITAxMBwCzAMACfzKnMqMyqwCvALwCewCTAKABrwCPAJwBnwArAFAA5wAnAEwAz"
    "AJ0AnAA9ADwANQAvAP8BAACZAAsABAMAAQIACgAWABQAHQAXAB4AGQAYAQABAQECAQMBBAAjAAAAFgAAABcA"
    "AAANACoAKAQDBQMGAwgHCAgICQgKCAsIBAgFCAYEAQUBBgEDAwMBAwIEAgUCBgIAKwAJCAMEAwMDAgMBAC0A"
    "AgEBADMAJgAkAB0AIFK/hlbieIG1V86/QfZ19lhNcqQ+c7cvbMJo7xstvfYw"
)

# a TLS 1.0 device: ECDHE, DHE and RSA key exchange, all CBC with SHA-1:
# openssl s_client -connect 127.0.0.1:PORT -tls1 -cipher DEFAULT@SECLEVEL=0
TLS1 = base64.b64decode(
    "FgMBAGMBAABfAwE5m4kYXc70xcXO/Hbz954nPbzmGhms69pOJly/e4E4/gAAEsAKwBQAOcAJwBMAMwA1AC8A"
    "/wEAACQACwAEAwABAgAKAAwACgAdABcAHgAZABgAIwAAABYAAAAXAAA="
)

# one suite with RSA key exchange, as many printers:
# openssl s_client -connect 127.0.0.1:PORT -tls1 -cipher AES128-SHA:@SECLEVEL=0
TLS1_AES128 = base64.b64decode(
    "FgMBAD0BAAA5AwEXTagjNSY1I0m7c6UAt/BWJuyLtVQBZUIaCZ1+vv5pegAABAAvAP8BAAAMACMAAAAWAAAA"
    "FwAA"
)

# DHE key exchange only:
# openssl s_client -connect 127.0.0.1:PORT -tls1_2 -cipher DHE-RSA-AES128-SHA:@SECLEVEL=0
DHE_ONLY = base64.b64decode(
    "FgMBAHEBAABtAwM6sNXbdwgOds8ygelYxACq8RJg6Y3iYWLAtGAMXscwxQAABAAzAP8BAABAACMAAAAWAAAA"
    "FwAAAA0AMAAuBAMFAwYDCAcICAgJCAoICwgECAUIBgQBBQEGAQMDAgMDAQIBAwICAgQCBQIGAg=="
)

# TLS 1.3 only:
# openssl s_client -connect 127.0.0.1:PORT -tls1_3
TLS13 = base64.b64decode(
    "FgMBANwBAADYAwP+X545Xiou+Dita8by4D0JIuPfzWQRFmUsn+8AuRu1sSBQFidWstwlviYEEnoGcWJU8iBM"
    "ifKTFBT70tar0ZaqGQAIEwITAxMBAP8BAACHAAsABAMAAQIACgAWABQAHQAXAB4AGQAYAQABAQECAQMBBAAj"
    "AAAAFgAAABcAAAANAB4AHAQDBQMGAwgHCAgICQgKCAsIBAgFCAYEAQUBBgEAKwADAgMEAC0AAgEBADMAJgAk"
    "AB0AIBRjQcmCGEr5UjmMRUlvEjy62wGMlPOWu7LwXLVeTTp3"
)

# TLS 1.2 with a server name:
# openssl s_client -connect 127.0.0.1:PORT -tls1_2 -servername printer.example
SNI = base64.b64decode(
    "FgMBAM8BAADLAwMAFebB8GMQENPAOGPzZJpJzZaSYplVmAzKINYFQqqq9AAAOMAswDAAn8ypzKjMqsArwC8A"
    "nsAkwCgAa8AjwCcAZ8AKwBQAOcAJwBMAMwCdAJwAPQA8ADUALwD/AQAAagAAABQAEgAAD3ByaW50ZXIuZXhh"
    "bXBsZQALAAQDAAECAAoADAAKAB0AFwAeABkAGAAjAAAAFgAAABcAAAANACoAKAQDBQMGAwgHCAgICQgKCAsI"
    "BAgFCAYEAQUBBgEDAwMBAwIEAgUCBgI="
)

# TLS 1.2 accepting SHA-1 signatures only:
# openssl s_client -connect 127.0.0.1:PORT -tls1_2 -sigalgs RSA+SHA1 -cipher DEFAULT@SECLEVEL=0
SHA1_SIGNATURES = base64.b64decode(
    "FgMBAIMBAAB/AwOnP5UWsSAR5Dj8/+Ahe1NMcJAk7y9FfPsMaprZDcfb0AAAKsAwAJ/MqMyqwC8AnsAoAGvA"
    "JwBnwBQAOcATADMAnQCcAD0APAA1AC8A/wEAACwACwAEAwABAgAKAAwACgAdABcAHgAZABgAIwAAABYAAAAX"
    "AAAADQAEAAICAQ=="
)
