"""End to end: Modbus and WITS0 sources, the agent as a child process, and the WITSML log sync."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from buffer.store import BufferStats, read_stats
from cloud.witsml_store import document_page
from drivers.wits0_simulator import Wits0Simulator
from tests.peers import AgentProcess, CloudService, ModbusPeer, free_port, sim_device
from uplink.auth import generate_key_file
from uplink.witsml_doc import parse_log_documents

pytestmark = pytest.mark.e2e

log = logging.getLogger(__name__)

DEVICE_ID = "rig-witsml-edge"
LOG_UID = "rig-e2e-time"
SINKS = ["cloud", "witsml"]
PERIOD_US = 1_000_000
OUTAGE_S = 10.0
CURVES = {
    # channel: (curve key in [witsml.curves], mnemonic)
    "pit_volume": ("plc/pit_volume", "PITV"),
    "pump_rate": ("pump_rate", "SPM1"),
    "DBTM": ("DBTM", "DBTM"),
    "SPPA": ("edr/SPPA", "SPPA"),
}
"""The mapped channels. Channel names are unique over both sources, because the
readings the cloud service stores, from which the expected rows are computed,
carry no source name."""


def toml_value(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def write_config(
    path: Path, data_dir: Path, modbus_port: int, wits0_url: str, cloud: str, key: Path
) -> None:
    """Write the agent config: Modbus every 200 ms, WITS0 every 700 ms, [cloud] and [witsml]."""
    lines = [
        "[agent]",
        'rig_id = "rig-e2e"',
        f"data_dir = {toml_value(str(data_dir))}",
        'log_format = "json"',
        'metrics_listen = ""',
        "[buffer]",
        'commit_interval = "100ms"',
        "[cloud]",
        f"url = {toml_value(cloud)}",
        f"device_id = {toml_value(DEVICE_ID)}",
        f"private_key_file = {toml_value(str(key))}",
        'interval = "200ms"',
        'timeout = "5s"',
        'retry_max_delay = "1s"',
        "[witsml]",
        'interval = "1s"',
        'row_period = "1s"',
        'settle = "1s"',
        'well_uid = "W-E2E"',
        'well_name = "E2E 1H"',
        'wellbore_uid = "WB-E2E"',
        'wellbore_name = "E2E 1H OH"',
        f"log_uid = {toml_value(LOG_UID)}",
        'log_name = "E2E time log"',
        "[witsml.curves]",
    ]
    lines += [f"{toml_value(key)} = {{ mnemonic = {toml_value(m)} }}" for key, m in CURVES.values()]
    lines += [
        "[[sources.modbus]]",
        'name = "plc"',
        f'url = "tcp://127.0.0.1:{modbus_port}"',
        "unit_id = 1",
        'poll_interval = "200ms"',
        'timeout = "500ms"',
        "[[sources.modbus.points]]",
        'channel = "pit_volume"',
        'table = "holding"',
        "address = 0",
        'type = "uint16"',
        "scale = 0.1",
        'unit = "m3"',
        "[[sources.modbus.points]]",
        'channel = "pump_rate"',
        'table = "holding"',
        "address = 1",
        'type = "uint16"',
        'unit = "spm"',
        "[[sources.wits0]]",
        'name = "edr"',
        f"url = {toml_value(wits0_url)}",
        'items = "standard-01"',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def buffer_stats(data_dir: Path) -> BufferStats:
    return read_stats(data_dir, SINKS)


def cursors(data_dir: Path) -> dict[str, int]:
    return {sink.name: sink.cursor for sink in buffer_stats(data_dir).sinks}


async def wait_until(check: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit_s:.0f} s waiting for {what}") from None


async def add_fault(service: CloudService, **fault: object) -> None:
    """Queue one fault on the service, including the WITSML field `route`."""
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        response = await client.post("/_test/faults", json=fault)
    response.raise_for_status()


async def pending_faults(service: CloudService) -> list[object]:
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        response = await client.get("/_test/faults")
    response.raise_for_status()
    return list(response.json()["pending"])


@contextlib.asynccontextmanager
async def changing_registers(peer: ModbusPeer) -> AsyncIterator[None]:
    """Write new values to holding registers 0 and 1 every 90 ms, so each poll reads new ones."""

    async def write_loop() -> None:
        count = 0
        while True:
            count += 1
            await peer.write(1, "holding", 0, [count % 65536, (count * 7) % 1000])
            await asyncio.sleep(0.09)

    task = asyncio.create_task(write_loop())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def parse_ts(text: str) -> int:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def expected_rows(readings: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Return, per row period, the value of each mapped channel's last usable reading."""
    latest: dict[int, dict[str, tuple[int, int, float]]] = {}
    for reading in readings:
        channel = reading["channel"]
        if channel not in CURVES or reading["quality"] == "bad" or reading["value"] is None:
            continue
        ts_us = parse_ts(reading["ts"])
        row = latest.setdefault(ts_us // PERIOD_US * PERIOD_US, {})
        candidate = (ts_us, int(reading["seq"]), float(reading["value"]))
        if channel not in row or candidate[:2] > row[channel][:2]:
            row[channel] = candidate
    return {
        start: {CURVES[ch][1]: cell[2] for ch, cell in row.items()} for start, row in latest.items()
    }


async def test_outage_and_kill_every_row_once(
    tmp_path: Path, assert_witsml_valid: Callable[[bytes], None]
) -> None:
    """A 10 s service outage and a SIGKILL mid-sync leave every row period stored once, right."""
    key_file = tmp_path / "device-key.pem"
    key = generate_key_file(key_file)
    service = CloudService()
    service.register_key(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    peer = ModbusPeer([sim_device(1)], tcp_port=free_port())
    edr = Wits0Simulator(interval=0.7, seed=7)
    data_dir = tmp_path / "data"
    config = tmp_path / "agent.toml"
    agent = AgentProcess(config, tmp_path / "agent.log")

    async def stored_rows() -> int:
        logs = {entry["uid"]: entry for entry in await service.witsml_logs()}
        return int(logs[LOG_UID]["rows"]) if LOG_UID in logs else 0

    try:
        service.start()
        await peer.start()
        await edr.start()
        write_config(config, data_dir, peer.tcp_port, edr.url, service.base_url, key_file)
        async with changing_registers(peer):
            await agent.start()

            async def some_rows() -> bool:
                return await stored_rows() >= 2

            await wait_until(some_rows, 20, "the first rows")

            # (a) The service is away for 10 s while the agent keeps buffering.
            service.stop()
            await asyncio.sleep(OUTAGE_S)
            behind = buffer_stats(data_dir).last_seq - cursors(data_dir)["witsml"]
            service.start()
            rows_before = await stored_rows()

            async def caught_up() -> bool:
                return await stored_rows() >= rows_before + OUTAGE_S - 1

            await wait_until(caught_up, 20, "the rows of the outage")

            # (b) A document is in flight when the agent is killed: the service returned
            # 503 with Retry-After, and the agent is waiting to send it again.
            await add_fault(service, status=503, retry_after=30, count=1, route="witsml")

            async def fault_used() -> bool:
                return not await pending_faults(service)

            await wait_until(fault_used, 10, "a witsml request after the fault")
            agent.kill()
            await agent.start()
            await asyncio.sleep(3.0)
        await edr.stop()
        await peer.stop()

        async def drained() -> bool:
            first = buffer_stats(data_dir)
            await asyncio.sleep(1.0)
            second = buffer_stats(data_dir)
            return second.last_seq == first.last_seq and all(
                sink.depth == 0 for sink in second.sinks
            )

        await wait_until(drained, 30, "both sinks to catch up")
        assert agent.terminate() == 0
        final = buffer_stats(data_dir)
        readings = await service.readings(DEVICE_ID)
        (stored,) = parse_log_documents(await service.witsml_log(LOG_UID))
        documents = await service.witsml_documents()
    finally:
        agent.close()
        await edr.stop()
        await peer.stop()
        service.close()

    log.info(
        "witsml e2e: %d readings, %d rows, %d documents, %d readings behind after the outage",
        final.last_seq,
        len(stored.rows),
        len(documents),
        behind,
    )
    assert behind > 0
    assert final.quarantined == 0
    assert [int(r["seq"]) for r in readings] == list(range(1, final.last_seq + 1))

    expected = expected_rows(readings)
    starts = [ts_us for ts_us, _ in stored.rows]
    assert len(starts) == len(set(starts)), "a row period is stored twice"
    assert sorted(starts) == sorted(expected)
    mnemonics = [curve.mnemonic for curve in stored.curves]
    assert sorted(mnemonics) == sorted(m for _, m in CURVES.values())
    wrong = []
    for ts_us, texts in stored.rows:
        values = {m: float(t) for m, t in zip(mnemonics, texts, strict=True) if t is not None}
        if values != expected[ts_us]:
            wrong.append((ts_us, values, expected[ts_us]))
    assert wrong == [], f"{len(wrong)} rows differ from the last readings, first: {wrong[0]}"
    # Most rows carry values from both sources: the exceptions are the seconds
    # around the agent's restart and the end, when the sources stop.
    both = [start for start, row in expected.items() if {"PITV", "DBTM"} <= set(row)]
    assert len(both) > len(expected) // 2

    assert len(documents) >= 3
    for document in documents:
        assert_witsml_valid(document)


def test_demo_shows_stored_rows(
    tmp_path: Path, assert_witsml_valid: Callable[[bytes], None]
) -> None:
    """`rig-agent demo` uploads a log fed by both simulators and prints the rows stored."""
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--duration", "8", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"WITSML log demo-rig-time on the service: (\d+) rows", result.stdout)
    assert match is not None, result.stdout
    assert int(match.group(1)) >= 3
    heads = result.stdout[match.end() :].splitlines()[1]
    # Hook load comes from the Modbus simulator and the tank volume from the WITS0 one.
    assert "HKLA klbf" in heads
    assert "TVA m3" in heads
    with contextlib.closing(sqlite3.connect(tmp_path / "cloud.sqlite3")) as conn:
        documents = document_page(conn, 0, 10_000)
    assert documents
    for document in documents:
        assert_witsml_valid(base64.b64decode(document["body_base64"]))
