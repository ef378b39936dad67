"""The ``smtpbridge`` command: configuration and upstream check, password hashing, OAuth2
sign-in."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING, Any

from twisted.internet.task import react

from smtpbridge.errors import ConfigError, SMTPReplyError
from smtpbridge.oauthlogin import add_command as add_oauth_login
from smtpbridge.queuecli import add_command as add_queue
from smtpbridge.users import hash_password

if TYPE_CHECKING:
    from collections.abc import Mapping

    from smtpbridge.connector import UpstreamConnector
    from smtpbridge.model import Assignment
    from smtpbridge.oauthconfig import OAuthSettings

PROG = "smtpbridge"
#: The longest password the command takes.
MAX_PASSWORD = 4096


class _InputError(Exception):
    """The password given on the terminal or stdin cannot be used."""


def _read_password() -> str:
    """Read the password: twice without echo on a terminal, else one line of stdin."""
    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Repeat password: ")
        if first != second:
            raise _InputError("passwords do not match")
        return first
    if sys.stdin is None:
        raise _InputError("no standard input")
    line = sys.stdin.readline(MAX_PASSWORD + 3)
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    if len(line) > MAX_PASSWORD:
        raise _InputError(f"a password is at most {MAX_PASSWORD} characters")
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # (bytes that are no UTF-8, kept as surrogates)
        raise _InputError("the password is not UTF-8 text") from None
    return line


def _hash_password(args: argparse.Namespace) -> int:
    try:
        password = _read_password()
    except _InputError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except (EOFError, KeyboardInterrupt):
        print(f"{PROG}: no password given", file=sys.stderr)
        return 2
    if not password:
        print(f"{PROG}: empty password refused", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def _check(args: argparse.Namespace) -> int:
    """Check the configuration, then perform a real upstream handshake with each account."""
    from twisted.internet import reactor

    from smtpbridge.config import load_config
    from smtpbridge.service import upstreams

    try:
        config = load_config(args.config)
        upstream = upstreams(config, reactor)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}")
    print(f"config ok: {args.config}")
    if args.config_only:
        return 0

    oauth = {name: account.oauth for name, account in config.accounts.items()
             if account.oauth is not None}

    async def run(reactor: Any) -> None:
        failures = await _check_upstreams(upstream.connector, upstream.checked(), oauth)
        print("PASS: the upstream accepts the bridge" if not failures
              else f"FAIL: {failures} upstream check(s) failed")
        if failures:
            raise SystemExit(1)

    try:
        react(run)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


async def _check_upstreams(connector: UpstreamConnector, assignments: list[Assignment],
                           oauth: Mapping[str, OAuthSettings] | None = None) -> int:
    """Connect, STARTTLS, verify, AUTH and QUIT with every account; the number that failed.
    An OAuth2 account (C{oauth}, by name) shows its checked settings and gets a token first."""
    from smtpbridge.oauthconfig import describe

    def progress(step: str, detail: str) -> None:
        print(f"  ok    {step:<9} {detail}")

    failures = 0
    for assignment in assignments:
        account = assignment.account
        name = account.username if account is not None else "(no AUTH: passthrough)"
        tokens = connector.tokens.get(account.name) if account is not None else None
        settings = (oauth or {}).get(account.name) if account is not None else None
        for route in assignment.routes:
            print(f"upstream {route.host}:{route.port} as {name}")
            try:
                for step, detail in describe(settings) if settings is not None else ():
                    progress(step, detail)
                if tokens is not None:
                    await tokens.token()
                    progress("token", "OAuth2 access token obtained")
                session = await connector.connect(route, account, progress=progress)
            except SMTPReplyError as e:
                reply = e.reply
                print(f"  FAIL  {reply.code} {reply.enhanced} {reply.text}")
                failures += 1
                continue
            await session.quit()
            progress("QUIT", "session closed")
    return failures


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="SMTP submission bridge: administration commands."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser(
        "check", help="check a configuration file and the upstream login",
        description="Load the configuration, then connect to the upstream, STARTTLS, verify "
        "its certificate and log in, printing each step. Exit status 0 when all passed.")
    check.add_argument("--config", required=True, metavar="FILE", help="the TOML file")
    check.add_argument("--config-only", action="store_true",
                       help="only check the configuration file, do not connect upstream")
    check.set_defaults(func=_check)

    hashing = commands.add_parser(
        "hash-password",
        help="print a scrypt hash for the users file",
        description="Read a password (twice on a terminal, else one line of standard input)"
        " and print its hash for a 'name:hash' line of the users file.",
    )
    hashing.set_defaults(func=_hash_password)
    add_oauth_login(commands)
    add_queue(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line C{argv} (default: the process arguments); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
