"""A third-party credential mapper installed as a Twisted plugin from another directory."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
import time

import pytest

from tests.conftest import PASSWORD, USER, client_context
from tests.upstream import Upstream, upstream

FIXTURES = (upstream,)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "twisted", "plugins", "smtpbridge_helo_mapper.py")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def bridge_config(tmp_path, up: Upstream, certificate, users_file: str) -> str:
    (tmp_path / "scanner-password").write_text(up.password + "\n")
    path = tmp_path / "bridge.toml"
    path.write_text(f"""
[server]
hostname = "localhost"

[tls]
certificate = "{certificate[0]}"
key = "{certificate[1]}"

[[listener]]
name = "smtps"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"

[access]
users_file = "{users_file}"

[upstream]
host = "{up.host}"
port = {up.port}
ca_certificates = "{up.ca_file}"

[account.scanner]
username = "{up.username}"
password_file = "scanner-password"

[credentials]
mapper = "helo"

[credentials.options.devices]
"scanner-2f" = "scanner"
""")
    return str(path)


@pytest.fixture
def plugin_dir(tmp_path) -> str:
    """A directory holding twisted/plugins/<the example>, as a third party would ship it."""
    target = tmp_path / "site" / "twisted" / "plugins"
    target.mkdir(parents=True)
    shutil.copy(EXAMPLE, target)
    assert not (tmp_path / "site" / "twisted" / "__init__.py").exists()
    return str(tmp_path / "site")


def test_the_bridge_relays_through_a_plugin_mapper(tmp_path, upstream, certificate,
                                                   users_file, plugin_dir):
    config = bridge_config(tmp_path, upstream, certificate, users_file)
    env = dict(os.environ, PYTHONPATH=plugin_dir)
    process = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "--logfile=-",
                                "smtpbridge", "--config", config], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port, log, deadline = None, [], time.monotonic() + 30
        while port is None and time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
            log.append(line)
            found = re.search(r"listener smtps listening on 127.0.0.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        assert port, "".join(log)
        for helo, expected in (("scanner-2f", None), ("unknown-device", 550)):
            with smtplib.SMTP_SSL("127.0.0.1", port, context=client_context(certificate),
                                  local_hostname=helo, timeout=30) as client:
                client.login(USER, PASSWORD)
                if expected is None:
                    client.sendmail("scan@example.com", ["office@example.com"],
                                    b"Subject: via plugin\r\n\r\nhello\r\n")
                else:
                    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                        client.sendmail("scan@example.com", ["office@example.com"], b"x")
                    assert refused.value.smtp_code == expected
                    assert b"Unknown device" in refused.value.smtp_error
        [stored] = upstream.stored()
        assert stored.sent == b"Subject: via plugin\r\n\r\nhello\r\n"
        assert upstream.logins == [("PLAIN", upstream.username, True)]
    finally:
        process.terminate()
        process.wait(30)


def test_a_bad_plugin_option_is_a_config_error(tmp_path, upstream, certificate, users_file,
                                               plugin_dir):
    config = bridge_config(tmp_path, upstream, certificate, users_file)
    text = open(config).read().replace('"scanner-2f" = "scanner"', '"scanner-2f" = "nobody"')
    open(config, "w").write(text)
    result = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "smtpbridge", "--config",
                             config], env=dict(os.environ, PYTHONPATH=plugin_dir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f"smtpbridge: configuration error: {config}: credentials.options: "
                             "helo: devices name unknown accounts: nobody\n")


def test_the_readme_shows_the_example_whole():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(EXAMPLE, encoding="utf-8") as f:
        example = f.read()
    assert example.strip() in readme
