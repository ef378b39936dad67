"""The configuration contract: every mistake is one clear line naming file, key and reason."""

from __future__ import annotations

import json
import os
import re

import pytest

from smtpbridge.config import load_config, parse_config
from smtpbridge.errors import ConfigError
from smtpbridge.service import upstreams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MINIMAL = """
[[listener]]
name = "plain"
endpoint = "tcp:2525"
tls = "none"
auth = "optional"

[upstream]
host = "smtp.example.com"

[credentials]
username = "relay@example.com"
password_env = "SMTPBRIDGE_TEST_PASSWORD"
"""


@pytest.fixture(autouse=True)
def upstream_password(monkeypatch):
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "from-env")


def error_of(text: str, path: str = "/etc/smtpbridge/test.toml") -> str:
    """The one-line error for C{text}, found as ``smtpbridge check --config-only`` finds it:
    reading the file, then building the mapper (which checks its own options)."""
    with pytest.raises(ConfigError) as info:
        upstreams(parse_config(text, path), None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(path)
    return message


def test_minimal_config_has_the_documented_defaults():
    config = parse_config(MINIMAL, "/x/test.toml")
    assert config.server.max_message_size == 36_700_160
    assert config.server.idle_timeout == 300
    assert config.upstream.port == 587 and config.upstream.ca_certificates is None
    assert [str(n) for n in config.access.trusted_networks] == ["127.0.0.0/8", "::1/128"]
    listener = config.listeners[0]
    assert listener.min_tls_version == "1.2" and not listener.allow_plaintext_auth
    assert config.credentials.mapper == "static"


def test_the_annotated_example_parses(tmp_path):
    with open(os.path.join(ROOT, "etc", "smtpbridge.toml"), encoding="utf-8") as f:
        text = f.read()
    (tmp_path / "upstream-password").write_text("not-a-real-password\n")
    text = text.replace("/etc/smtpbridge/", f"{tmp_path}/")
    config = parse_config(text, str(tmp_path / "smtpbridge.toml"))
    assert [listener.name for listener in config.listeners] == ["smtps", "legacy"]
    assert config.accounts["default"].password.value == "not-a-real-password"
    assert "not-a-real-password" not in repr(config)


def test_the_demo_config_parses():
    config = load_config(os.path.join(ROOT, "etc", "demo.toml"))
    assert {listener.tls for listener in config.listeners} == {"implicit", "starttls"}
    assert all("127.0.0.1" in listener.endpoint for listener in config.listeners)
    assert config.demo is not None
    assert config.tls.certificate == os.path.join(ROOT, "var", "demo", "tls", "cert.pem")


@pytest.mark.parametrize("text, key, reason", [
    (MINIMAL + "\n[server]\nhostnme = 'x'\n", "server.hostnme", "unknown key"),
    ("bogus = 1\n" + MINIMAL, "bogus", "unknown key"),
    (MINIMAL + "\nbogus = 1\n", "credentials.bogus", "unknown key"),
    (MINIMAL.replace('tls = "none"', 'tls = "none"\ncolour = "red"'), "listener[0].colour",
     "unknown key"),
    (MINIMAL + "\n[server]\nmax_message_size = '10MB'\n", "server.max_message_size",
     "expected an integer, got a string"),
    (MINIMAL + "\n[server]\nidle_timeout = true\n", "server.idle_timeout",
     "expected an integer, got a boolean"),
    (MINIMAL.replace('host = "smtp.example.com"', 'host = "h"\nport = 70000'), "upstream.port",
     "must be 1..65535"),
    (MINIMAL.replace('host = "smtp.example.com"', 'host = "h"\ntls = "none"'), "upstream.tls",
     "must be one of"),
    (MINIMAL.replace('username = "relay@example.com"\n', ""), "credentials.username",
     "required key is missing"),
    (MINIMAL.replace('password_env = "SMTPBRIDGE_TEST_PASSWORD"\n', ""),
     "credentials.password_file", "password is missing"),
    (MINIMAL.split("[credentials]")[0], "credentials", "required table is missing"),
    (MINIMAL.replace('tls = "none"', 'tls = "ssl"'), "listener[0].tls", "must be one of"),
    (MINIMAL.replace('endpoint = "tcp:2525"\n', ""), "listener[0].endpoint",
     "required key is missing"),
    (MINIMAL + "\n[access]\ntrusted_networks = '10.0.0.0/8'\n", "access.trusted_networks",
     "expected a list"),
    (MINIMAL.replace('tls = "none"', 'tls = "implicit"'), "tls.certificate",
     "certificate and key are required"),
    (MINIMAL.replace('auth = "optional"', 'auth = "required"'), "listener[0].auth",
     "accepts no one"),
    (MINIMAL.split("[upstream]")[0] + MINIMAL, "listener[1].name", "duplicate listener name"),
    ("[server]\nhostname = 'x'\n", "listener", "required key is missing"),
    (MINIMAL + "password = 'hunter2'\n", "credentials.password",
     "use password_file or password_env"),
    (MINIMAL.replace("SMTPBRIDGE_TEST_PASSWORD", "SMTPBRIDGE_TEST_UNSET_VARIABLE"),
     "credentials.password_env", "is not set"),
])
def test_mistakes_name_the_key_and_the_reason(text, key, reason):
    message = error_of(text)
    assert f": {key}: " in message
    assert reason in message
    assert "hunter2" not in message


def test_not_toml():
    assert "not valid TOML" in error_of("[server\n")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read configuration: No such file or directory"


def test_a_file_too_large_to_be_a_configuration(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: larger than 1 MiB: not a configuration"


def test_secret_from_file_and_env(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    with_file = MINIMAL.replace('password_env = "SMTPBRIDGE_TEST_PASSWORD"',
                                'password_file = "pw"')
    config = parse_config(with_file, str(tmp_path / "c.toml"))
    assert config.accounts["default"].password.value == "from-file"
    config = parse_config(MINIMAL, str(tmp_path / "c.toml"))
    assert config.accounts["default"].password.value == "from-env"
    assert "from-env" not in repr(config) and "from-env" not in str(config.accounts)
    message = error_of(with_file.replace('"pw"', '"missing"'), str(tmp_path / "c.toml"))
    assert "credentials.password_file: cannot read" in message
    secret.write_text("x" * (64 * 1024 + 1))  # no secret: not read to its end
    message = error_of(with_file, str(tmp_path / "c.toml"))
    assert message.endswith(f"credentials.password_file: {secret} is longer than 65536 "
                            "characters") and "xxxx" not in message
    secret.write_text("from-file\n")
    both = MINIMAL.replace('password_env', 'password_file = "pw"\npassword_env')
    assert "not both" in error_of(both, str(tmp_path / "c.toml"))


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    config = parse_config("[access]\nusers_file = 'users'\n" + MINIMAL,
                          str(tmp_path / "sub" / "c.toml"))
    assert config.access.users_file == str(tmp_path / "sub" / "users")


@pytest.mark.parametrize("name", ["m365.toml", "gmail.toml"])
def test_the_provider_examples_parse(tmp_path, name):
    with open(os.path.join(ROOT, "etc", name), encoding="utf-8") as f:
        text = f.read().replace("/etc/smtpbridge/", f"{tmp_path}/")
    text = text.replace("/var/lib/smtpbridge/", f"{tmp_path}/")
    for secret in ("m365-client-secret", "gmail-client-secret", "gmail-refresh-token"):
        (tmp_path / secret).write_text("not-a-real-secret\n")
    config = parse_config(text, str(tmp_path / name))
    [account] = config.accounts.values()
    assert account.mechanism == "xoauth2" and account.rewrite_sender
    assert account.oauth.token_url.startswith("https://")
    if name == "m365.toml":
        assert account.oauth.grant == "client_credentials"
        assert account.oauth.scope == "https://outlook.office365.com/.default"
        assert config.upstream.hosts == ("smtp.office365.com",)
    else:
        assert account.oauth.grant == "refresh_token"
        assert account.oauth.token_url == "https://oauth2.googleapis.com/token"
        assert config.upstream.hosts == ("smtp.gmail.com",)


@pytest.mark.parametrize("oauth, key, reason", [
    ('grant = "refresh_token"\nprovider = "google"\nclient_id = "x"\n',
     "account.a.oauth.refresh_token_file", "required for grant = 'refresh_token'"),
    ('grant = "client_credentials"\nprovider = "microsoft"\nclient_id = "x"\nscope = "s"\n'
     'client_secret_env = "SMTPBRIDGE_TEST_PASSWORD"\n', "account.a.oauth.tenant", "required"),
    ('grant = "client_credentials"\ntoken_url = "https://t.example/token"\nclient_id = "x"\n'
     'scope = "s"\n', "account.a.oauth.client_secret", "not both"),
    ('grant = "token_file"\ntoken_url = "http://t.example/token"\ntoken_file = "t"\n',
     "account.a.oauth.token_url", "https://"),
    ('grant = "device"\n', "account.a.oauth.grant", "must be one of"),
    ('grant = "client_credentials"\ntoken_url = "http://t.example/token"\nclient_id = "x"\n'
     'scope = "s"\nclient_secret_env = "SMTPBRIDGE_TEST_PASSWORD"\n',
     "account.a.oauth.token_url", "https://"),
    ('grant = "client_credentials"\ntoken_url = "https://t.example/token"\nclient_id = "x"\n'
     'scope = "s"\nclient_secret_env = "SMTPBRIDGE_TEST_PASSWORD"\n'
     'client_certificate = "c.pem"\nclient_key = "c.key"\n',
     "account.a.oauth.client_secret", "not both"),
    ('grant = "refresh_token"\ntoken_url = "https://t.example/token"\nclient_id = "x"\n',
     "account.a.oauth.refresh_token_file", "required for grant = 'refresh_token'"),
])
def test_oauth_mistakes(oauth, key, reason):
    text = MINIMAL.replace('[credentials]', '[account.a]\nusername = "a@example.com"\n'
                           'mechanism = "xoauth2"\n[account.a.oauth]\n' + oauth
                           + '\n[credentials]\naccount = "a"')
    single_account = 'username = "relay@example.com"\npassword_env = "SMTPBRIDGE_TEST_PASSWORD"\n'
    text = text.replace(single_account, "")
    message = error_of(text)
    assert f": {key}: " in message and reason in message


@pytest.mark.parametrize("mode, who", [(0o640, "its group"), (0o604, "others"),
                                       (0o644, "its group and others")])
def test_secret_files_others_can_read_are_refused(tmp_path, mode, who):
    password = tmp_path / "upstream-password"
    password.write_text("secret\n")
    password.chmod(mode)
    text = MINIMAL.replace('password_env = "SMTPBRIDGE_TEST_PASSWORD"',
                           f'password_file = "{password}"')
    message = error_of(text, str(tmp_path / "c.toml"))
    assert message == (f"{tmp_path}/c.toml: credentials.password_file: {password} can be "
                       f"read by {who} (mode {mode:04o}): chmod 600 {password} (or set "
                       "[server] allow_readable_secrets = true)")
    password.chmod(0o600)
    assert parse_config(text, str(tmp_path / "c.toml")).warnings == ()


def test_every_kind_of_secret_file_is_checked(tmp_path):
    for name in ("users", "key.pem", "cert.pem"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "cert.pem").chmod(0o644)  # a certificate is public: not checked
    for name, key, text in [
        ("users", "access.users_file", f'[access]\nusers_file = "{tmp_path}/users"\n'),
        ("key.pem", "tls.key", f'[tls]\ncertificate = "{tmp_path}/cert.pem"\n'
                               f'key = "{tmp_path}/key.pem"\n'),
    ]:
        (tmp_path / name).chmod(0o644)
        assert f": {key}: " in error_of(text + MINIMAL, str(tmp_path / "c.toml"))
        (tmp_path / name).chmod(0o600)


def test_allow_readable_secrets_turns_the_refusal_into_a_warning(tmp_path):
    password = tmp_path / "upstream-password"
    password.write_text("secret\n")
    password.chmod(0o644)
    text = "[server]\nallow_readable_secrets = true\n" + MINIMAL.replace(
        'password_env = "SMTPBRIDGE_TEST_PASSWORD"', f'password_file = "{password}"')
    config = parse_config(text, str(tmp_path / "c.toml"))
    assert config.warnings == (
        f"{tmp_path}/c.toml: credentials.password_file: {password} can be read by its group "
        f"and others (mode 0644): chmod 600 {password}",)


def test_the_limits_have_their_documented_defaults():
    config = parse_config(MINIMAL, "/x/test.toml")
    server, access = config.server, config.access
    assert (server.handshake_timeout, server.max_session_time) == (30, 3600)
    assert (server.max_connections, server.max_connections_per_client) == (1000, 50)
    assert (server.received_header_login, server.allow_readable_secrets) == (False, False)
    assert config.listeners[0].backlog == 511 and config.listeners[0].max_connections is None
    assert (access.auth_threads, access.auth_queue, access.auth_rate) == (2, 32, 20.0)
    assert access.login_cache_time == 3600
    route = config.upstream
    assert (route.max_sessions, route.session_wait, route.data_timeout) == (20, 30, 180)
    assert (route.session_idle, route.max_messages_per_session) == (30, 100)


def test_every_setting_is_in_the_annotated_example():
    import attr

    from smtpbridge.config import (
        AccessConfig,
        AdminConfig,
        ListenerConfig,
        LogConfig,
        RateLimitConfig,
        ServerConfig,
        SpoolConfig,
        TLSConfig,
    )
    from smtpbridge.upstreamconfig import RouteConfig

    with open(os.path.join(ROOT, "etc", "smtpbridge.toml"), encoding="utf-8") as f:
        text = f.read()
    keys = {"token": "token_file"}  # a secret is written as the file that holds it
    missing = [f"{cls.__name__}.{field.name}" for cls in (
        ServerConfig, TLSConfig, ListenerConfig, AccessConfig, RouteConfig, SpoolConfig,
        LogConfig, RateLimitConfig, AdminConfig)
        for field in attr.fields(cls)
        if field.name not in ("name", "hosts", "pin_sha256")
        and not re.search(rf"^#? ?{keys.get(field.name, field.name)} = ", text,
                          re.MULTILINE)]
    assert missing == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("table, key", [("access", "auth_block_time"),
                                        ("access", "auth_rate"),
                                        ("access", "auth_cool_down")])
def test_a_number_that_is_no_finite_number_is_refused(monkeypatch, table, key, value):
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    text = MINIMAL.replace(f"[{table}]\n", f"[{table}]\n{key} = {value}\n") \
        if f"[{table}]\n" in MINIMAL else f"[{table}]\n{key} = {value}\n" + MINIMAL
    assert error_of(text).endswith(f": {table}.{key}: must be a finite number, not "
                                   f"{float(value)}")


@pytest.mark.parametrize("name", ["", "mail relay", "relay\r\n250 ok", "-relay", "relay.",
                                  "a" * 254])
def test_a_hostname_that_is_no_host_name_is_refused(monkeypatch, name):
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    text = "[server]\nhostname = " + json.dumps(name) + "\n" + MINIMAL
    assert ": server.hostname: " in error_of(text)
    assert "is not a host name" in error_of(text)


def test_a_host_name_is_taken(monkeypatch):
    monkeypatch.setenv("SMTPBRIDGE_TEST_PASSWORD", "secret")
    text = '[server]\nhostname = "smtp-relay.example.com"\n' + MINIMAL
    assert parse_config(text, "/x/c.toml").server.hostname == "smtp-relay.example.com"
