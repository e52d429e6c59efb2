"""Failure paths a field technician meets: a shared data_dir, a corrupt buffer, secrets in logs."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from agent.logs import configure_logging
from buffer.store import Buffer, BufferInUseError


async def test_second_buffer_on_data_dir_rejected(tmp_path: Path) -> None:
    """A second Buffer on the same data_dir fails with a message naming the holder's pid."""
    async with Buffer(tmp_path, ["mqtt"]):
        with pytest.raises(BufferInUseError) as caught:
            async with Buffer(tmp_path, ["mqtt"]):
                pass
    assert f"pid {os.getpid()}" in str(caught.value)
    assert "agent.data_dir" in str(caught.value)


async def test_lock_released_on_close(tmp_path: Path) -> None:
    """Closing a Buffer releases the data_dir lock for the next agent."""
    async with Buffer(tmp_path, ["mqtt"]):
        pass
    async with Buffer(tmp_path, ["mqtt"]) as buffer:
        assert buffer.last_seq == 0


def test_second_agent_refuses_to_start(tmp_path: Path) -> None:
    """`rig-agent run` on a data_dir in use exits 2 with a plain message and no traceback."""
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nrig_id = "r"\ndata_dir = "{tmp_path}"\nlog_format = "json"\n')
    holder = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert holder.stdout is not None
        for line in holder.stdout:
            if b'"agent_started"' in line:
                break
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        holder.terminate()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    assert result.returncode == 2
    assert "another rig-agent" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_corrupt_buffer_set_aside(tmp_path: Path) -> None:
    """A buffer file full of garbage is renamed aside with both paths logged, and the agent runs."""
    (tmp_path / "buffer.sqlite3").write_bytes(os.urandom(8192))
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nrig_id = "r"\ndata_dir = "{tmp_path}"\nlog_format = "json"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "agent_started" in line:
                break
        assert any("agent_started" in line for line in lines), "".join(lines)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    text = "".join(lines) + output
    set_aside = [json.loads(line) for line in lines if "buffer_corrupt_set_aside" in line]
    assert len(set_aside) == 1, text
    assert set_aside[0]["path"].endswith("buffer.sqlite3")
    assert "buffer-corrupt-" in set_aside[0]["moved_to"]
    assert "Traceback" not in text
    assert process.returncode == 0
    assert len(list(tmp_path.glob("buffer-corrupt-*.db"))) == 1


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_traceback_logs_no_locals(log_format: str) -> None:
    """A logged exception carries code locations but not the values of local variables."""
    out = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_library_level = logging.getLogger("pymodbus").level
    configure_logging("info", log_format, stream=out)  # type: ignore[arg-type]
    try:
        password = "S3cr3t-Pa55"  # noqa: S105 - the secret the test looks for
        raise RuntimeError(f"failed after {len(password)} characters")
    except RuntimeError:
        structlog.get_logger("test").exception("task_failed")
    finally:
        structlog.reset_defaults()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.getLogger("pymodbus").setLevel(saved_library_level)
    text = out.getvalue()
    assert "task_failed" in text
    assert "RuntimeError" in text
    assert "S3cr3t-Pa55" not in text
    if log_format == "json":
        assert json.loads(text.splitlines()[-1])["event"] == "task_failed"


async def test_wits0_junk_warned_once() -> None:
    """Junk on a WITS0 link is logged as one warning with counts, not once per read."""
    from structlog.testing import capture_logs

    from buffer.reading import Reading
    from config.model import Wits0Source
    from drivers.wits0 import Wits0Driver

    source = Wits0Source.model_validate({"name": "edr", "url": "tcp://127.0.0.1:5000"})
    driver = Wits0Driver(source)
    emitted: list[Reading] = []

    async def emit(readings: object) -> None:
        emitted.extend(readings)  # type: ignore[call-overload]

    with capture_logs() as logs:
        for _ in range(20):
            await driver._received(b"\x00\xff garbage at the wrong baud rate \x13", emit)
    warnings = [entry for entry in logs if entry["event"] == "wits0_bad_data"]
    assert len(warnings) == 1
    assert warnings[0]["new_junk_bytes"] > 0
    assert warnings[0]["log_level"] == "warning"
    assert emitted == []


def test_log_level_reaches_bound_loggers() -> None:
    """A level set again (as a reload does) applies to loggers bound before the change."""
    out = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_library_level = logging.getLogger("pymodbus").level
    try:
        configure_logging("info", "json", stream=out)
        bound = structlog.get_logger("test").bind(sink="mqtt")
        bound.debug("before_reload")
        configure_logging("debug", "json", stream=out)
        bound.debug("after_reload")
        configure_logging("warning", "json", stream=out)
        bound.info("quiet_again")
        bound.warning("still_shown")
    finally:
        structlog.reset_defaults()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.getLogger("pymodbus").setLevel(saved_library_level)
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["after_reload", "still_shown"]


def test_missing_password_file_stops_run(tmp_path: Path) -> None:
    """A missing mqtt.password_file stops `run` at start, naming the file, not at each reconnect."""
    missing = tmp_path / "mqtt-password"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nrig_id = "r"\ndata_dir = "{tmp_path}"\nlog_format = "json"\n'
        f'metrics_listen = ""\n\n[mqtt]\nurl = "mqtt://127.0.0.1:1"\nusername = "rig"\n'
        f'password_file = "{missing}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "rig-agent did not start" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
