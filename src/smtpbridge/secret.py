"""A secret value (password, token) that never shows in a repr, a log line or an error."""

from __future__ import annotations

import attr

#: The most a file holding a secret or a token may hold, in characters.
SECRET_FILE_LIMIT = 64 * 1024


def read_secret_file(path: str) -> str:
    """The text of a UTF-8 file holding a secret or a token, read no further than
    L{SECRET_FILE_LIMIT} characters.  OSError, UnicodeDecodeError, or ValueError when
    it is longer; none of them shows the content."""
    with open(path, encoding="utf-8") as f:
        text = f.read(SECRET_FILE_LIMIT + 1)
    if len(text) > SECRET_FILE_LIMIT:
        raise ValueError(f"longer than {SECRET_FILE_LIMIT} characters")
    return text


@attr.frozen(repr=False)
class Secret:
    """A password or token; only C{value} holds it."""

    value: str

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__
