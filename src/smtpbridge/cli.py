"""The ``smtpbridge`` command: configuration check and password hashing."""

from __future__ import annotations

import argparse
import getpass
import sys

from smtpbridge.errors import ConfigError
from smtpbridge.users import hash_password

PROG = "smtpbridge"


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
    line = sys.stdin.readline()
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
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
    from smtpbridge.config import load_config

    try:
        load_config(args.config)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    print(f"config ok: {args.config}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="SMTP submission bridge: administration commands."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser("check", help="load a configuration file and report problems")
    check.add_argument("--config", required=True, metavar="FILE", help="the TOML file")
    check.set_defaults(func=_check)

    hashing = commands.add_parser(
        "hash-password",
        help="print a scrypt hash for the users file",
        description="Read a password (twice on a terminal, else one line of standard input)"
        " and print its hash for a 'name:hash' line of the users file.",
    )
    hashing.set_defaults(func=_hash_password)
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
