"""Where the log goes under ``twistd``: text or JSON lines, without Twisted's noise.

``[log] format = "json"`` writes one JSON object a line through twisted.logger's own
JSON support (C{jsonFileLogObserver}): every field of an event (the summary line's
sender, recipients, status...) is a key, with ``text`` (the formatted line) and
``level`` added, for Loki, Elastic or journald.  Both formats leave out the lines
Twisted writes for each port it opens and closes (the listeners log their own).

twistd builds its observer after the service, from its own options; the bridge's
service hands it this one as the application's C{ILogObserver} component.  The output
is twistd's: C{--logfile} (a file, rotated as twistd does) or standard output.  With
C{--syslog} or C{--logger}, twistd's choice stands.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    PredicateResult,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from zope.interface import implementer

#: What Twisted's ports log on their own: "SMTPServerFactory (TLS) starting on 465",
#: "(TCP Port 465 Closed)".
_PORT_NOISE = re.compile(r"^(?:.* starting on \d+|\(.*Port \d+ Closed\))$")


@implementer(ILogFilterPredicate)
class _NotPortNoise:
    """Drops Twisted's lines about its ports opening and closing."""

    def __call__(self, event: LogEvent) -> Any:
        if event.get("log_namespace") == "log_legacy":
            text = " ".join(str(part) for part in event.get("message", ()))
            if _PORT_NOISE.match(text):
                return PredicateResult.no
        return PredicateResult.maybe


@implementer(ILogObserver)
class _JSONLines:
    """JSON lines with the formatted text and the level's name beside the fields."""

    def __init__(self, output: IO[Any]) -> None:
        self._json = jsonFileLogObserver(output, recordSeparator="")

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        self._json(dict(event, text=formatEvent(event),
                        level=getattr(level, "name", None)))


def log_observer(format: str, output: IO[Any]) -> ILogObserver:
    """The observer for C{[log] format} ("text" or "json"), writing to C{output}."""
    inner: ILogObserver = (_JSONLines(output) if format == "json"
                           else textFileLogObserver(output))
    return FilteringLogObserver(inner, [_NotPortNoise()])


def twistd_output(options: Mapping[str, Any]) -> IO[Any] | None:
    """The file twistd would log to with these options; None when it logs elsewhere
    (syslog, a logger of the command line's choice)."""
    if options.get("syslog") or options.get("logger"):
        return None
    name = options.get("logfile")
    if name == "-" or (not name and options.get("nodaemon")):
        return sys.stdout
    output: IO[Any] = LogFile.fromFullPath(name or "twistd.log")
    return output


class LoggingRoot(MultiService):
    """The bridge's top service under twistd: gives the application its log observer."""

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:  # noqa: N802
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)
