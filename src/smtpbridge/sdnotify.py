"""systemd's notification protocol (sd_notify), in the few lines it takes.

With ``Type=notify`` systemd waits for ``READY=1`` before it counts the bridge as started
(and starts what depends on it), so the bridge says it once every listener listens, and
``STOPPING=1`` when it shuts down.  Outside systemd (no ``NOTIFY_SOCKET``) nothing is sent.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

log = Logger()


def notify(state: str, environ: Mapping[str, str]) -> bool:
    """Send C{state} (e.g. ``READY=1``) to systemd's socket; False when there is none or
    it cannot be reached (the bridge runs on regardless)."""
    address = environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address  # "@": abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warn("cannot notify systemd at {address}: {error}", address=address,
                 error=e.strerror or str(e))
        return False
    return True


class SystemdNotifier(Service):
    """The last service of the bridge: when it starts, every listener before it listens.
    READY=1 goes once the reactor runs (its signal handlers are in place, so a stop
    right after it is a clean one)."""

    def __init__(self, reactor: IReactorCore, environ: Mapping[str, str]) -> None:
        self._reactor = reactor
        self._environ = environ

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._reactor.callWhenRunning(notify, "READY=1\nSTATUS=listening", self._environ)

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        notify("STOPPING=1", self._environ)
