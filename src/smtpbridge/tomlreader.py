"""Strict reading of TOML tables: typed getters, paths, secrets; unknown keys are errors.

Every problem is a L{ConfigError} naming the file, the dotted key and the reason.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from smtpbridge.errors import ConfigError
from smtpbridge.secret import Secret, read_secret_file

#: A host name as a greeting, EHLO and Received: carry it.
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")

REQUIRED: Any = object()


class Table:
    """Reads one TOML table, remembering which keys were used to reject the rest."""

    def __init__(self, file: str, name: str, data: Any, base_dir: str,
                 secret_files: list[tuple[str, str]] | None = None) -> None:
        if not isinstance(data, dict):
            raise ConfigError(file, name, f"must be a table, not {_type_name(data)}")
        self.file = file
        self.name = name
        self.data = data
        self.base_dir = base_dir
        self.used: set[str] = set()
        # (dotted key, path) of every file read for a secret, shared by every table of
        # the file: whether others may read them is checked once all is read.
        self.secret_files = secret_files if secret_files is not None else []

    def sub(self, name: str, data: Any) -> Table:
        """A table within this file, sharing what it learns about secret files."""
        return Table(self.file, name, data, self.base_dir, self.secret_files)

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key(key) if key else self.name, reason)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(key, "required key is missing")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            raise self.error(key, f"expected {_NAMES.get(expected, expected)}, "
                                  f"got {_type_name(value)}")
        return value

    def string(self, key: str, default: Any = REQUIRED, choices: tuple[str, ...] = ()) -> Any:
        value = self.get(key, str, default)
        if isinstance(value, str) and choices and value not in choices:
            raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, "
                                  f"not {value!r}")
        if value == "" and default is REQUIRED:
            raise self.error(key, "must not be empty")
        return value

    def hostname(self, key: str, default: Any = REQUIRED) -> Any:
        """A host name (letters, digits, hyphens and dots): what a greeting, EHLO or a
        trace header may carry."""
        value = self.string(key, default)
        if isinstance(value, str) and not _HOSTNAME.fullmatch(value):
            raise self.error(key, f"{value!r} is not a host name (letters, digits, hyphens "
                                  "and dots)")
        return value

    def integer(self, key: str, default: Any = REQUIRED, minimum: int = 0,
                maximum: int | None = None) -> Any:
        value = self.get(key, int, default)
        if isinstance(value, int) and (value < minimum or maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"{minimum}..{maximum}"
            raise self.error(key, f"must be {bounds}, not {value}")
        return value

    def boolean(self, key: str, default: Any = REQUIRED) -> Any:
        return self.get(key, bool, default)

    def strings(self, key: str, default: Any = REQUIRED) -> Any:
        value = self.get(key, list, default)
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, str):
                    raise self.error(key, f"expected a list of strings, found {_type_name(item)}")
            return tuple(value)
        return value

    def path(self, key: str, default: Any = REQUIRED) -> Any:
        value = self.string(key, default)
        if not value:
            return None if value == "" else value
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def secret_path(self, key: str, default: Any = REQUIRED) -> Any:
        """The path of a file that holds a secret (a key, a users file, a token)."""
        value = self.path(key, default)
        if value:
            self.secret_files.append((self.key(key), value))
        return value

    def secret(self, key: str) -> Secret | None:
        """A secret given as ``<key>_file`` (a file holding it) or ``<key>_env`` (a variable)."""
        from_file = self.path(f"{key}_file", None)
        from_env = self.string(f"{key}_env", None)
        if key in self.data:
            self.used.add(key)
            raise self.error(key, f"secrets are not written in the config; "
                                  f"use {key}_file or {key}_env")
        if from_file and from_env:
            raise self.error(f"{key}_file", f"give either {key}_file or {key}_env, not both")
        if from_file:
            self.secret_files.append((self.key(f"{key}_file"), from_file))
            try:
                value = read_secret_file(from_file).strip("\r\n")
            except OSError as e:
                raise self.error(f"{key}_file", f"cannot read {from_file}: {e.strerror}")
            except UnicodeDecodeError:
                raise self.error(f"{key}_file", f"{from_file} is not UTF-8 text")
            except ValueError as e:  # (too long)
                raise self.error(f"{key}_file", f"{from_file} is {e}")
            if not value:
                raise self.error(f"{key}_file", f"{from_file} is empty")
            return Secret(value)
        if from_env:
            variable = os.environ.get(from_env)
            if not variable:
                raise self.error(f"{key}_env", f"environment variable {from_env} is not set")
            return Secret(variable)
        return None

    def number(self, key: str, default: Any = REQUIRED, minimum: float = 0.0) -> Any:
        value = self.get(key, (int, float), default)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(key, f"must be a finite number, not {value}")
        if isinstance(value, int | float) and value < minimum:
            raise self.error(key, f"must be at least {minimum:g}, not {value}")
        return float(value) if isinstance(value, int | float) else value

    def tables(self) -> list[tuple[str, Table]]:
        """Every sub-table of this table, by key, marked as used."""
        found = []
        for key, value in self.data.items():
            if isinstance(value, dict):
                self.used.add(key)
                found.append((key, self.sub(self.key(key), value)))
        return found

    def table(self, key: str, required: bool = False) -> Table | None:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "required table is missing")
            return None
        return self.sub(self.key(key), self.data[key])

    def done(self) -> None:
        for key in self.data:
            if key not in self.used:
                raise self.error(key, "unknown key")


_NAMES = {"str": "a string", "int": "an integer", "bool": "true or false", "list": "a list",
          "dict": "a table", "number": "a number"}


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a number"
    return _NAMES.get(type(value).__name__, type(value).__name__)
