"""The log under twistd: JSON lines that parse one by one, text lines, no port noise."""

from __future__ import annotations

import io
import json
import re
import smtplib
import subprocess
import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import (
    Logger,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    eventsFromJSONLogFile,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure

from smtpbridge.logs import ClassicText, log_observer
from tests.conftest import client_context, stored_messages
from tests.test_twistd import TWISTD, demo_copy


def emit(observer: object, *events: dict) -> None:
    for event in events:
        observer(event)  # type: ignore[operator]


def test_json_lines_carry_the_fields_the_text_and_the_level() -> None:
    output = io.StringIO()
    observer = log_observer("json", output)
    events: list[dict] = []
    Logger(namespace="test", observer=events.append).info(
        "{session} status={status}", session="abc", status="sent", recipients=["a@b"])
    emit(observer, *events)
    [line] = output.getvalue().splitlines()
    record = json.loads(line)
    assert (record["text"], record["level"]) == ("abc status=sent", "info")
    assert (record["session"], record["status"], record["recipients"]) == (
        "abc", "sent", ["a@b"])
    # Twisted reads its own JSON back.
    [event] = eventsFromJSONLogFile(io.StringIO(output.getvalue()), recordSeparator="")
    assert event["log_level"] == LogLevel.info


def test_twisted_port_lines_are_left_out() -> None:
    for format in ("json", "text"):
        output = io.StringIO()
        observer = log_observer(format, output)
        events: list[dict] = []
        for text in ("SMTPServerFactory (TLS) starting on 46465", "(TCP Port 46465 Closed)",
                     "something else entirely"):
            events.append({"log_namespace": "log_legacy", "message": (text,),
                           "log_format": "{log_text}", "log_text": text,
                           "log_level": LogLevel.info, "log_time": time.time()})
        emit(observer, *events)
        assert "starting on" not in output.getvalue()
        assert "Closed" not in output.getvalue()
        assert "something else entirely" in output.getvalue()


def test_twistd_writes_json_lines(tmp_path) -> None:
    path = demo_copy(tmp_path)
    secret = "Demo-Upstream-Secret-9"
    (tmp_path / "demo-password").write_text(secret + "\n", encoding="utf-8")
    with open(path, "a", encoding="utf-8") as f:
        f.write('\n[log]\nformat = "json"\n')
    process = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "smtpbridge", "--config",
                                path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: list[str] = []
    try:
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while len(ports) < 3 and time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            found = re.search(r"(listener \w+|demo upstream) listening on 127.0.0.1:(\d+)",
                              json.loads(line)["text"])
            if found:
                ports[found.group(1)] = int(found.group(2))
        assert len(ports) == 3, "".join(lines)
        context = client_context((str(tmp_path / "var" / "tls" / "cert.pem"), ""))
        with smtplib.SMTP_SSL("127.0.0.1", ports["listener smtps"], context=context,
                              timeout=30) as client:
            client.login("device", "device")
            client.sendmail("printer@example.com", ["office@example.com"],
                            b"Subject: json\r\n\r\nhello\r\n")
        assert len(stored_messages(str(tmp_path / "var" / "mail"))) == 1
        time.sleep(0.5)
    finally:
        process.terminate()
        rest, _ = process.communicate(timeout=30)
    lines += rest.splitlines(keepends=True)
    records = [json.loads(line) for line in lines if line.strip()]
    texts = [record["text"] for record in records]
    assert not [text for text in texts if "starting on" in text or "Closed)" in text]
    [summary] = [r for r in records if r.get("status") and r.get("listener") == "smtps"]
    assert (summary["status"], summary["login"], summary["sender"]) == (
        "sent", "device", "printer@example.com")
    assert summary["recipients"] == ["office@example.com"] and summary["code"] == 250
    assert secret not in "".join(lines)


# The text lines: what Twisted's own text observer writes, faster.

def twisted_text(event: dict) -> str | None:
    return formatEventAsClassicLogText(event, lambda when: formatTime(when, timeFormatRFC3339))


class Source:
    name = "listener"

    def __repr__(self) -> str:
        return "<Source>"

    def method(self) -> str:
        return "called"


FORMATS = st.sampled_from([
    "{session} status={status}", "plain text", "", "{session!r} {size:>8}",
    "{source.name} and {source!r}", "{items[0]} of {items}", "{source.method()}",
    "{missing}", "{0} positional", "{} empty", "{{braces}} {session}",
    "two\nlines {session}", "{size:.2f}", "{status!s:^9}",
])


@st.composite
def events(draw: st.DrawFn) -> dict:
    event = {"log_format": draw(FORMATS), "session": draw(st.text(max_size=12)),
             "status": draw(st.sampled_from(["sent", "spooled", "é\n", ""])),
             "size": draw(st.integers(-5, 10**9) | st.floats(allow_nan=False)),
             "source": Source(), "items": draw(st.lists(st.integers(), min_size=1,
                                                         max_size=3))}
    if isinstance(event["size"], float) and not 0 <= event["size"] < 1e12:
        event["size"] = 1.5
    for key, values in (("log_time", st.floats(0, 4e9) | st.none()),
                        ("log_level", st.sampled_from(list(LogLevel.iterconstants()))),
                        ("log_namespace", st.sampled_from(["smtpbridge.server", "x"])),
                        ("log_system", st.sampled_from(["-", "worker 1", 7]))):
        if draw(st.booleans()):
            event[key] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        event["log_format"] = draw(st.sampled_from([b"bytes {session}", None, 5]))
    return event


@given(st.lists(events(), min_size=1, max_size=4))
def test_text_lines_are_twisteds_for_any_event(batch: list[dict]) -> None:
    text = ClassicText()
    for event in batch:  # one formatter, events in any order of time
        assert text(event) == twisted_text(event)


def test_text_lines_with_a_traceback_or_read_back_from_json_are_twisteds() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    event = {"log_format": "{session} failed", "session": "abc", "log_failure": failure,
             "log_time": 1_800_000_000.5, "log_namespace": "n",
             "log_level": LogLevel.error}
    line = ClassicText()(event)
    assert line == twisted_text(event) and "ZeroDivisionError" in (line or "")
    flat = eventFromJSON(eventAsJSON({"log_format": "{source.method()} {session}",
                                      "session": "abc", "source": Source(),
                                      "log_time": 1_800_000_000.0}))
    assert ClassicText()(flat) == twisted_text(flat) == (
        f"{formatTime(1_800_000_000.0, timeFormatRFC3339)} [-#-] called abc\n")


def test_the_time_stamp_changes_with_the_second() -> None:
    text = ClassicText()
    for when in (1_800_000_000.0, 1_800_000_000.999, 1_800_000_001.0, 1_799_999_999.5,
                 1_800_000_099.9999996, 1_800_000_099.5, 1_800_000_100.2):
        event = {"log_format": "x", "log_time": when}
        assert text(event) == twisted_text(event)
