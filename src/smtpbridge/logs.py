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

import math
import re
import sys
from collections.abc import Mapping
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
    timeFormatRFC3339,
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


class ClassicText:
    """Twisted's classic text line for an event (``TIME [namespace#level] text``, as
    C{textFileLogObserver} writes it), at a fraction of its cost: the time stamp is
    formatted once a second, and a plain format string goes through C{str.format_map}.
    Anything else (a traceback, a call in the format, a field that is missing, an event
    read back from JSON) goes through Twisted's own formatter."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        # The second Twisted writes: datetime rounds the time to the microsecond first.
        second = math.floor(when)
        if round((when - second) * 1e6) >= 1_000_000:
            second += 1
        if second != self._second:  # the format has no fraction of a second
            self._second, self._stamp = second, formatTime(when, timeFormatRFC3339)
        return self._stamp

    def __call__(self, event: LogEvent) -> str | None:
        text = plain_text(event)
        system = event.get("log_system")
        if text is None or not (system is None or type(system) is str):
            return formatEventAsClassicLogText(event, self._time)
        if not text:
            return None
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def plain_text(event: LogEvent) -> str | None:
    """The event's text when C{str.format_map} can make it as Twisted would (None: ask
    Twisted's formatter)."""
    format = event.get("log_format")
    if type(format) is not str or "log_failure" in event or "log_flattened" in event:
        return None
    try:
        return format.format_map(event)
    except Exception:
        return None  # Twisted's formatter says what went wrong


def log_observer(format: str, output: IO[Any]) -> ILogObserver:
    """The observer for C{[log] format} ("text" or "json"), writing to C{output}."""
    inner: ILogObserver = (_JSONLines(output) if format == "json"
                           else FileLogObserver(output, ClassicText()))
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
