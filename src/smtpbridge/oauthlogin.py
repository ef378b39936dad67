"""The ``smtpbridge oauth-login`` command: obtain an account's first OAuth2 refresh token.

An administrator signs in once (L{smtpbridge.oauthflows}); the refresh token is
written (mode 0600) to the file a ``grant = "refresh_token"`` account reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any
from urllib.parse import quote

from twisted.internet.task import react

from smtpbridge.oauthconfig import PROVIDERS, is_https_url
from smtpbridge.oauthflows import (
    FormPoster,
    LoginError,
    LoginSettings,
    code_flow,
    device_flow,
    say,
)
from smtpbridge.oauthwire import read_text, write_atomically
from smtpbridge.secret import Secret

PROG = "smtpbridge: oauth-login"
NOT_OFFLINE = (
    "the sign-in succeeded but the token endpoint returned no refresh token: offline "
    "access was not granted (Microsoft: the scope needs offline_access; Google: the "
    "authorization needs access_type=offline and prompt=consent, which --provider google "
    "sends)")


def add_command(commands: Any) -> None:
    """Register ``oauth-login`` with the C{commands} of the ``smtpbridge`` parser."""
    parser = commands.add_parser(
        "oauth-login", help="obtain the first OAuth2 refresh token of an account",
        description="Sign in once as the sending account; the refresh token is written to a "
        "file (mode 0600) for grant = \"refresh_token\", never printed.")
    add = parser.add_argument
    add("--provider", choices=sorted(PROVIDERS),
        help="default endpoints, scope and flow; without it give --flow, --scope and the URLs")
    add("--flow", choices=("device", "code"), help="device code flow, or authorization code "
        "flow with PKCE and a loopback redirect (default: microsoft device, google code)")
    add("--tenant", help="Microsoft tenant ID or domain (default: organizations)")
    add("--client-id", required=True, metavar="ID", help="the application (client) ID")
    add("--client-secret-file", metavar="FILE", help="the client secret, if there is one")
    add("--scope", help="space-separated scopes (default: microsoft \"https://outlook."
        "office.com/SMTP.Send offline_access\", google \"https://mail.google.com/\")")
    add("--refresh-token-file", required=True, metavar="FILE",
        help="where the refresh token is written (replaced atomically, mode 0600)")
    add("--login-hint", metavar="ADDRESS", help="the account to sign in as (code flow)")
    add("--authorize-url", metavar="URL", help="authorization endpoint (code flow)")
    add("--token-url", metavar="URL", help="token endpoint")
    add("--device-url", metavar="URL", help="device authorization endpoint (device flow)")
    add("--ca-certificates", metavar="FILE",
        help="PEM bundle to trust for the endpoints (default: the system trust store)")
    add("--timeout", type=float, default=600.0, metavar="SECONDS",
        help="how long to wait for the sign-in (default: 600)")
    add("--no-browser", action="store_true",
        help="no effect: the URL is always printed and no browser is started")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """The command's entry point: run the login on the global reactor; the exit status."""
    async def run(reactor: Any) -> None:
        code = await login(reactor, args)
        if code:
            raise SystemExit(code)

    try:
        react(run)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0

def fail(reason: str) -> int:
    """Report the failure in one line on standard error; exit status 1."""
    say(f"{PROG}: {reason}", sys.stderr)
    return 1


async def login(reactor: Any, args: argparse.Namespace) -> int:
    """Sign in with the flow C{args} ask for and write the refresh token; the exit status."""
    try:
        settings = settings_from(args)
        poster = FormPoster(reactor, settings)
        flow = device_flow if settings.flow == "device" else code_flow
        token = (await flow(reactor, settings, poster)).get("refresh_token")
        if not isinstance(token, str) or not token.strip():
            raise LoginError(NOT_OFFLINE)
        try:
            write_atomically(settings.refresh_token_file, token.strip() + "\n")
        except OSError as e:
            raise LoginError(f"cannot write {settings.refresh_token_file}: {e.strerror or e}")
    except LoginError as e:
        return fail(str(e))
    except Exception as e:  # a bug: its text is not shown, it might hold a secret
        return fail(f"internal error ({type(e).__name__})")
    say(f"refresh token written to {settings.refresh_token_file}")
    return 0


def settings_from(args: argparse.Namespace) -> LoginSettings:
    """The settings for C{args}, the provider's defaults filled in; LoginError if unusable."""
    provider = PROVIDERS.get(args.provider or "")
    if args.tenant is not None and args.provider != "microsoft":
        raise LoginError("--tenant is only used with --provider microsoft")
    if provider is not None:
        provider = provider.for_tenant(quote(args.tenant or "organizations", safe=""))
    defaults = {} if provider is None else {
        "flow": provider.login_flow, "scope": provider.login_scope,
        "token_url": provider.token_url, "authorize_url": provider.authorize_url,
        "device_url": provider.device_url}

    def option(name: str) -> str | None:
        value: str | None = getattr(args, name)
        return value or defaults.get(name) or None

    flow, scope = option("flow"), option("scope")
    if flow is None or scope is None:
        raise LoginError(f"--{'scope' if flow else 'flow'} is needed without --provider")
    names = ("token_url", "device_url" if flow == "device" else "authorize_url")
    urls = {name: option(name) for name in names}
    for name, url in urls.items():
        flag = "--" + name.replace("_", "-")
        if url is None:
            raise LoginError(f"{flag} is needed without --provider")
        if not is_https_url(url):
            raise LoginError(f"{flag} must be an https:// URL")
    if not 0 < args.timeout <= 86400:
        raise LoginError("--timeout must be more than 0 and at most 86400 seconds")
    client_secret = None
    if args.client_secret_file is not None:
        path = args.client_secret_file
        try:
            client_secret = Secret(read_text(path))
        except (OSError, ValueError) as e:  # the text is not shown: it is a secret
            raise LoginError(f"cannot read the client secret file {path}: "
                             f"{getattr(e, 'strerror', None) or 'not UTF-8 text'}")
        if not client_secret.value:
            raise LoginError(f"the client secret file {path} is empty")
    path = args.refresh_token_file  # checked now rather than after the sign-in
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.access(directory, os.W_OK | os.X_OK):
        raise LoginError(f"cannot write {path}: " + ("it is a directory" if os.path.isdir(
            path) else f"the directory {directory} is missing or not writable"))
    return LoginSettings(
        flow=flow, client_id=args.client_id, client_secret=client_secret, scope=scope,
        refresh_token_file=args.refresh_token_file, login_hint=args.login_hint,
        authorize_url=urls.get("authorize_url"), token_url=str(urls["token_url"]),
        device_url=urls.get("device_url"), extras=provider.login_extras if provider else (),
        ca_certificates=args.ca_certificates, timeout=args.timeout)
