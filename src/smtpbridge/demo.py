"""The embedded demo upstream: stores every message it accepts as an ``.eml`` file.

It is our own server protocol behind a STARTTLS-only, AUTH-required listener,
so the demo shows the whole path without any account at a provider.  Each
message is written to ``<mail_dir>/tmp``, fsynced, and renamed into
``<mail_dir>/new`` with its envelope beside it as ``.json``.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import BinaryIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer

from smtpbridge.interfaces import (
    IAccessPolicy,
    IDelivery,
    IPasswordChecker,
    ITransaction,
    Params,
)
from smtpbridge.model import ClientInfo, Reply
from smtpbridge.replies import RECIPIENT_OK, SENDER_OK, START_DATA
from smtpbridge.server import SMTPServerFactory
from smtpbridge.serverbase import ListenerSettings, SessionLogger
from smtpbridge.tls import ServerTLS


@implementer(ITransaction)
class FileTransaction:
    """One message on its way into the mail folder."""

    def __init__(self, directory: str, client: ClientInfo) -> None:
        self._directory = directory
        self._client = client
        self._name = f"{int(time.time())}.{secrets.token_hex(8)}"
        self._tmp_path = os.path.join(directory, "tmp", self._name + ".eml")
        self._file: BinaryIO | None = None
        self._sender = ""
        self._recipients: list[str] = []

    def mail(self, sender: str, params: Params) -> Deferred[Reply]:
        self._sender = sender
        return succeed(SENDER_OK)

    def rcpt(self, recipient: str, params: Params) -> Deferred[Reply]:
        self._recipients.append(recipient)
        return succeed(RECIPIENT_OK)

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        self._file = open(self._tmp_path, "wb")  # noqa: SIM115 - closed in finish/abort
        return succeed(START_DATA)

    def write(self, lines: Sequence[bytes]) -> None:
        assert self._file is not None, "write outside DATA"
        self._file.write(b"\r\n".join(lines) + b"\r\n")

    def finish(self) -> Deferred[Reply]:
        f, self._file = self._file, None
        assert f is not None, "finish outside DATA"
        f.flush()
        os.fsync(f.fileno())
        f.close()
        new = os.path.join(self._directory, "new", self._name)
        envelope = {"sender": self._sender, "recipients": self._recipients,
                    "client": self._client.peer_host, "login": self._client.login}
        with open(new + ".json.tmp", "w", encoding="utf-8") as meta:
            json.dump(envelope, meta)
        os.rename(new + ".json.tmp", new + ".json")
        os.rename(self._tmp_path, new + ".eml")
        return succeed(Reply(250, "2.0.0", f"Ok: stored as {self._name}"))

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            os.unlink(self._tmp_path)


@implementer(IDelivery)
class MailFolderDelivery:
    """Delivers into a folder of ``.eml`` files."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        for sub in ("tmp", "new"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)

    def transaction(self, client: ClientInfo) -> FileTransaction:
        return FileTransaction(self.directory, client)


@implementer(IPasswordChecker)
class SingleUserChecker:
    """The demo upstream's one account."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def check(self, username: str, password: str) -> Deferred[bool]:
        expected = self._users.get(username)
        return succeed(expected is not None and secrets.compare_digest(
            expected.encode(), password.encode()))


@implementer(IAccessPolicy)
class AuthenticatedOnly:
    """Only authenticated clients may send; nothing is trusted by address."""

    def may_submit(self, client: ClientInfo, auth_required: bool) -> Reply | None:
        return None if client.login else Reply(530, "5.7.0", "Authentication required")

    def may_send_as(self, client: ClientInfo, sender: str) -> Reply | None:
        return None


def demo_upstream_factory(delivery: IDelivery, username: str, password: str,
                          tls: ServerTLS, clock: IReactorTime,
                          hostname: str = "localhost") -> SMTPServerFactory:
    """The demo upstream: STARTTLS offered, AUTH required after it, messages to files.

    Its sessions log as ``smtpbridge.demo``, each line beginning "demo upstream", so that
    the bridge's sessions and the upstream's, which see the same messages, are not
    mistaken for each other.
    """
    # No Received: header of its own, so the stored file shows what the bridge sent.
    settings = ListenerSettings(name="demo-upstream", hostname=hostname, tls="starttls",
                                auth_required=True, received_header=False)
    return SMTPServerFactory(settings, delivery, AuthenticatedOnly(),
                             SingleUserChecker({username: password}), clock, tls,
                             log=SessionLogger("smtpbridge.demo", label="demo upstream"))
