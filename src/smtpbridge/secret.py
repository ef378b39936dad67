"""A secret value (password, token) that never shows in a repr, a log line or an error."""

from __future__ import annotations

import attr

#: The most a file holding a secret or a token may hold, in characters.
SECRET_FILE_LIMIT = 64 * 1024


@attr.frozen(repr=False)
class Secret:
    """A password or token; only C{value} holds it."""

    value: str

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__
