"""``twistd smtpbridge``: command-line options and the service maker."""

from __future__ import annotations

import sys

from twisted.python import usage

from smtpbridge.errors import ConfigError


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = "Run the SMTP submission bridge described by a TOML configuration file."
    optParameters = [  # noqa: RUF012
        ["config", "c", "/etc/smtpbridge/smtpbridge.toml", "The configuration file."],
        # Set by the supervisor of [server] workers for the processes it starts.
        ["worker", None, None, "Run as worker N of a supervisor (set by the supervisor)."],
        ["worker-count", None, None, "How many workers the supervisor runs (set by it)."],
        ["adopt", None, "", "NAME=FD,...: the listening sockets a worker adopts."],
    ]

    def postOptions(self) -> None:  # noqa: N802
        for name in ("worker", "worker-count"):
            value = self[name]
            if value is not None and not (value.isascii() and value.isdigit() and int(value) >= 1):
                raise usage.UsageError(f"--{name} wants a number from 1 up, not {value!r}")


def makeService(options: Options) -> object:  # noqa: N802
    """Read the configuration and build the bridge; a bad one stops the start in one line."""
    from twisted.internet import reactor

    from smtpbridge.config import load_config
    from smtpbridge.listener import HeapFreezer
    from smtpbridge.logs import LoggingRoot, log_observer, twistd_output
    from smtpbridge.service import make_service
    from smtpbridge.workers import become_worker, parse_adopted, supervisor_service

    try:
        if options["worker"]:
            become_worker()
        config = load_config(options["config"])
        for warning in config.warnings:
            sys.stderr.write(f"smtpbridge: warning: {warning}\n")
        if options["worker"]:
            # The supervisor's count, not the file's: the file may have changed since.
            count = int(options["worker-count"] or config.server.workers)
            service = make_service(config, reactor, adopted=parse_adopted(options["adopt"]),
                                   worker=int(options["worker"]), workers=count)
        elif config.server.workers > 1:
            service = supervisor_service(config, reactor)
        else:
            service = make_service(config, reactor)
        # Last, so that the heap is frozen after every other part has started.
        HeapFreezer().setServiceParent(service)  # type: ignore[no-untyped-call]
    except ConfigError as e:
        sys.stderr.write(f"smtpbridge: configuration error: {e}\n")
        raise SystemExit(1)
    # twistd's own options say where the log goes; [log] format says how.
    twistd_options = getattr(options, "parent", None)
    try:
        output = twistd_output(twistd_options) if twistd_options is not None else None
    except OSError as e:
        sys.stderr.write(f"smtpbridge: cannot write the log: {e.filename}: {e.strerror}\n")
        raise SystemExit(1)
    if output is None:
        return service
    root = LoggingRoot(log_observer(config.log.format, output))
    service.setServiceParent(root)
    return root
