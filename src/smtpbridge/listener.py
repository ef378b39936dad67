"""A listening endpoint as a twistd service; a port that cannot be bound stops the start."""

from __future__ import annotations

import sys

from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class ListenerService(Service):
    """Listens on one endpoint; a port that cannot be bound stops the start in one line."""

    def __init__(self, name: str, description: str, endpoint: object, factory: object) -> None:
        self.name = name
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        outcome: list = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            message = f"cannot listen on {self.description}: {outcome[0].getErrorMessage()}"
            log.critical("{message}", message=message)
            # twistd has already pointed sys.stderr at the log; the terminal needs it too.
            (sys.__stderr__ or sys.stderr).write(f"smtpbridge: {message}\n")
            raise SystemExit(1)
        if not outcome:
            raise RuntimeError(f"{self.description}: the endpoint did not listen at once")
        self.port = outcome[0]
        address = self.port.getHost()
        log.info("{name} listening on {host}:{port}", name=self.name,
                 host=getattr(address, "host", address), port=getattr(address, "port", ""))

    def startService(self) -> None:  # noqa: N802
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> object:  # noqa: N802
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
