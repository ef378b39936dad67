"""The ``smtpbridge oauth-login`` command: obtain an account's first OAuth2 refresh token.

An administrator signs in once (L{smtpbridge.oauthflows}); the refresh token is
written (mode 0600, owned by the bridge's user with ``--owner``) to the file a
``grant = "refresh_token"`` account reads.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import stat
import sys
from typing import Any
from urllib.parse import quote

from twisted.internet.task import react

from smtpbridge.oauthconfig import (
    PROVIDERS,
    STATE_DIRECTORY,
    environment_proxy,
    is_https_url,
    proxy_problem,
)
from smtpbridge.oauthflows import (
    FormPoster,
    LoginError,
    LoginSettings,
    code_flow,
    device_flow,
    say,
)
from smtpbridge.oauthwire import read_text, reason, write_atomically
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
    add("--tenant", help="Microsoft: the Directory (tenant) ID or domain of the app "
        "registration, required (\"organizations\" only for a multi-tenant app)")
    add("--client-id", required=True, metavar="ID", help="the application (client) ID")
    add("--client-secret-file", metavar="FILE", help="the client secret, if there is one")
    add("--scope", help="space-separated scopes (default: microsoft \"https://outlook."
        "office.com/SMTP.Send offline_access\", google \"https://mail.google.com/\")")
    add("--refresh-token-file", required=True, metavar="FILE",
        help="where the refresh token is written (replaced atomically, mode 0600), e.g. "
        f"{STATE_DIRECTORY}/NAME-refresh-token")
    add("--owner", metavar="USER", help="the user the bridge runs as: the file is given "
        "to them (needs root), after checking they may replace it in its directory, as the "
        "bridge does when the token rotates")
    add("--proxy", metavar="URL", help="an HTTP proxy for the endpoints, http://HOST:PORT "
        "(default: HTTPS_PROXY unless NO_PROXY names the token endpoint's host)")
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
    ended: list[int] = []

    async def run(reactor: Any) -> None:
        code = await login(reactor, args)
        ended.append(code)
        if code:
            raise SystemExit(code)

    try:
        react(run)
    except SystemExit as e:
        if ended:
            return e.code if isinstance(e.code, int) else 1
    if not ended:  # stopped by a signal (Ctrl-C) before the sign-in ended
        say(f"{PROG}: interrupted, nothing written", sys.stderr)
        return 130
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
        owner = settings.owner
        try:
            write_atomically(settings.refresh_token_file, token.strip() + "\n",
                             owner[1:] if owner else None)
        except OSError as e:
            raise LoginError(f"cannot write {settings.refresh_token_file}: {e.strerror or e}")
    except LoginError as e:
        return fail(str(e))
    except Exception as e:  # a bug: its text is not shown, it might hold a secret
        return fail(f"internal error ({type(e).__name__})")
    owned = f" (owned by {settings.owner[0]})" if settings.owner else ""
    say(f"refresh token written to {settings.refresh_token_file}{owned}")
    return 0


def settings_from(args: argparse.Namespace) -> LoginSettings:
    """The settings for C{args}, the provider's defaults filled in; LoginError if unusable."""
    provider = PROVIDERS.get(args.provider or "")
    if args.tenant is not None and args.provider != "microsoft":
        raise LoginError("--tenant is only used with --provider microsoft")
    if args.provider == "microsoft" and not args.tenant:
        raise LoginError("--tenant is needed with --provider microsoft: the Directory "
                         "(tenant) ID or domain of the app registration, as in the config "
                         "(a single-tenant app refuses \"organizations\": AADSTS50194)")
    if provider is not None:
        provider = provider.for_tenant(quote(args.tenant or "", safe=""))
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
            raise LoginError(f"cannot read the client secret file {path}: {reason(e)}")
        if not client_secret.value:
            raise LoginError(f"the client secret file {path} is empty")
    path = args.refresh_token_file  # checked now rather than after the sign-in
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.access(directory, os.W_OK | os.X_OK):
        raise LoginError(f"cannot write {path}: " + ("it is a directory" if os.path.isdir(
            path) else f"the directory {directory} is missing or not writable"))
    owner = file_owner(args.owner, directory) if args.owner else None
    if owner is None and os.geteuid() == 0:
        say(f"note: {path} will belong to root; the bridge must read and replace it as "
            "its own user: give --owner USER (or run this as that user)")
    return LoginSettings(
        flow=flow, client_id=args.client_id, client_secret=client_secret, scope=scope,
        refresh_token_file=args.refresh_token_file, login_hint=args.login_hint,
        authorize_url=urls.get("authorize_url"), token_url=str(urls["token_url"]),
        device_url=urls.get("device_url"), extras=provider.login_extras if provider else (),
        ca_certificates=args.ca_certificates, timeout=args.timeout,
        proxy=login_proxy(args.proxy, str(urls["token_url"])), owner=owner)


def login_proxy(given: str | None, token_url: str) -> str | None:
    """The proxy of --proxy ("" for none), else of the environment; LoginError if unusable."""
    proxy, source = (given or None, "--proxy") if given is not None \
        else environment_proxy(token_url)
    written = "on the command line" if given is not None else None
    if proxy is not None and (problem := proxy_problem(proxy, written)) is not None:
        raise LoginError(f"{source}: {problem}")
    return proxy


def file_owner(name: str, directory: str) -> tuple[str, int, int]:
    """The user C{name} (and their group) for the token file: LoginError unless it exists,
    this is root (or that user) and C{directory} lets that user replace the file."""
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise LoginError(f"--owner: there is no user {name}")
    if os.geteuid() not in (0, user.pw_uid):
        raise LoginError(f"--owner {name} needs root: run it with sudo, or as {name} "
                         f"(sudo -u {name} smtpbridge oauth-login ...) without --owner")
    if not writable_by(directory, user):
        raise LoginError(f"{name} cannot write the directory {directory}, where the bridge "
                         f"replaces the rotated token: chown {name} {directory}, or use "
                         f"{STATE_DIRECTORY}/")
    return name, user.pw_uid, user.pw_gid


def writable_by(directory: str, user: pwd.struct_passwd) -> bool:
    """Whether the permission bits of C{directory} let C{user} create and rename files."""
    info = os.stat(directory)
    if user.pw_uid == 0:
        return True
    if info.st_uid == user.pw_uid:
        wanted = stat.S_IWUSR | stat.S_IXUSR
    elif info.st_gid == user.pw_gid or user.pw_name in _members(info.st_gid):
        wanted = stat.S_IWGRP | stat.S_IXGRP
    else:
        wanted = stat.S_IWOTH | stat.S_IXOTH
    return info.st_mode & wanted == wanted


def _members(gid: int) -> list[str]:
    """The users listed as members of the group C{gid} (none if it has no entry)."""
    try:
        return grp.getgrgid(gid).gr_mem
    except KeyError:
        return []
