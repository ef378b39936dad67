"""Listener certificates: reloaded on SIGHUP without dropping connections; one per listener;
the DH group every listener offers."""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import threading
import time

import pytest
from OpenSSL import SSL

from smtpbridge.tls import create_self_signed, server_context
from tests.conftest import start_bridge, stop_bridge, stored_messages
from tests.test_twistd import TWISTD, demo_copy


class Running:
    """A twistd process whose log lines are collected as they come."""

    def __init__(self, config: str) -> None:
        self.process = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "smtpbridge", "--config",
             config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                found = re.search(pattern, line)
                if found:
                    return found
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in:\n{''.join(self.lines)}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def fingerprint(sock: ssl.SSLSocket) -> str:
    return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()


def trusting(*certificates: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for certificate in certificates:
        context.load_verify_locations(certificate)
    return context


def test_sighup_reloads_the_certificate_and_keeps_open_sessions(tmp_path):
    config = demo_copy(tmp_path)
    bridge = Running(config)
    try:
        port = int(bridge.wait_for(r"listener smtps listening on 127.0.0.1:(\d+)").group(1))
        cert = str(tmp_path / "var" / "tls" / "cert.pem")
        key = str(tmp_path / "var" / "tls" / "key.pem")
        old = str(tmp_path / "old.pem")
        with open(cert, "rb") as f, open(old, "wb") as g:
            g.write(f.read())
        before = smtplib.SMTP_SSL("127.0.0.1", port, context=trusting(old), timeout=30)
        before.login("device", "device")
        old_fingerprint = fingerprint(before.sock)

        create_self_signed(cert, key, "localhost")  # a new key and certificate
        mark = len(bridge.lines)
        os.kill(bridge.process.pid, signal.SIGHUP)
        bridge.wait_for(r"certificates reloaded", after=mark)

        new = str(tmp_path / "new.pem")
        with open(cert, "rb") as f, open(new, "wb") as g:
            g.write(f.read())
        with smtplib.SMTP_SSL("127.0.0.1", port, context=trusting(new), timeout=30) as after:
            new_fingerprint = fingerprint(after.sock)
            assert new_fingerprint != old_fingerprint
        # The session opened before the reload goes on with its certificate.
        before.sendmail("printer@example.com", ["office@example.com"],
                        b"Subject: across a reload\r\n\r\nstill here\r\n")
        before.quit()
        assert stored_messages(str(tmp_path / "var" / "mail")) == [
            b"Subject: across a reload\r\n\r\nstill here\r\n"]

        # Files that do not load leave the working certificate in place.
        with open(cert, "w") as f:
            f.write("broken\n")
        mark = len(bridge.lines)
        os.kill(bridge.process.pid, signal.SIGHUP)
        bridge.wait_for(r"certificates not reloaded, the old ones stay in use: .*cert.pem "
                        r"holds no usable PEM certificate", after=mark)
        with smtplib.SMTP_SSL("127.0.0.1", port, context=trusting(new), timeout=30) as third:
            assert fingerprint(third.sock) == new_fingerprint
        assert bridge.process.poll() is None
    finally:
        bridge.stop()


def test_a_listener_can_have_its_own_certificate(reactor, bridge_config, tmp_path, certificate):
    own_cert, own_key = str(tmp_path / "own.pem"), str(tmp_path / "own.key")
    create_self_signed(own_cert, own_key, "localhost")
    config = bridge_config.replace(
        'tls = "implicit"\n', f'tls = "implicit"\ncertificate = "{own_cert}"\n'
                              f'key = "{own_key}"\n', 1)
    running = start_bridge(reactor, config, str(tmp_path))
    try:
        served = {}
        for name in ("smtps", "legacy"):
            port = running.ports[name]
            if name == "smtps":
                with smtplib.SMTP_SSL("127.0.0.1", port, context=trusting(own_cert),
                                      timeout=30) as client:
                    served[name] = fingerprint(client.sock)
            else:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.starttls(context=trusting(certificate[0]))
                    served[name] = fingerprint(client.sock)
        assert served["smtps"] != served["legacy"]
    finally:
        stop_bridge(reactor, running)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is missing")
def test_the_listeners_dh_group_is_rfc_7919_ffdhe2048(certificate):
    """Every listener offers DHE, with the published group that openssl itself knows."""
    shipped = importlib.resources.files("smtpbridge").joinpath("ffdhe2048.pem").read_text()
    made = subprocess.run(["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt",
                           "group:ffdhe2048"], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    assert shipped == made
    for version in ("1.0", "1.2"):
        context = server_context(*certificate, min_version=version)
        assert "DHE-RSA-AES128-SHA" in SSL.Connection(context, None).get_cipher_list()


def test_a_self_signed_certificate_names_the_given_hosts_and_addresses(tmp_path):
    """[tls] self_signed_names: devices that connect by address find it in the certificate."""
    from cryptography import x509

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    create_self_signed(cert, key, "bridge.example",
                       ["192.0.2.10", "printer-gateway.example", "2001:db8::25", "localhost"])
    with open(cert, "rb") as f:
        names = x509.load_pem_x509_certificate(f.read()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "bridge.example", "localhost", "printer-gateway.example"]
    assert [str(address) for address in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1", "::1", "192.0.2.10", "2001:db8::25"]
