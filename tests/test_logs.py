"""The log under twistd: JSON lines that parse one by one, text lines, no port noise."""

from __future__ import annotations

import io
import json
import re
import smtplib
import subprocess
import time

from twisted.logger import Logger, LogLevel, eventsFromJSONLogFile

from smtpbridge.logs import log_observer
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
