"""End to end: the rig simulator, the agent as a child process and the reference cloud service."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from buffer.store import BufferStats, read_stats
from drivers.simulator import RigSimulator, simulator_points
from tests.peers import AgentProcess, CloudService
from uplink.auth import generate_key_file

pytestmark = pytest.mark.e2e

log = logging.getLogger(__name__)

DEVICE_ID = "rig-e2e-edge"
OUTAGE_S = 30.0
RECOVERY_TIMEOUT = 30.0
"""Seconds to wait for uploads after the outage: the agent's retry backoff is capped at 2 s."""


def toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def write_config(path: Path, data_dir: Path, modbus_url: str, cloud_url: str, key: Path) -> None:
    """Write an agent config: the simulator polled every 50 ms, a [cloud] sink and no [mqtt]."""
    lines = [
        "[agent]",
        'rig_id = "rig-e2e"',
        f"data_dir = {toml_value(str(data_dir))}",
        'log_format = "json"',
        'metrics_listen = ""',
        "[buffer]",
        'commit_interval = "100ms"',
        "[cloud]",
        f"url = {toml_value(cloud_url)}",
        f"device_id = {toml_value(DEVICE_ID)}",
        f"private_key_file = {toml_value(str(key))}",
        "batch_max_readings = 500",
        'interval = "200ms"',
        'timeout = "5s"',
        'retry_max_delay = "2s"',
        "[[sources.modbus]]",
        'name = "rig-sim"',
        f"url = {toml_value(modbus_url)}",
        "unit_id = 1",
        'poll_interval = "50ms"',
        'timeout = "500ms"',
    ]
    for point in simulator_points():
        lines.append("[[sources.modbus.points]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in point.items() if v is not None]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def buffer_stats(data_dir: Path) -> BufferStats:
    return read_stats(data_dir, ["cloud"])


def cloud_depth(data_dir: Path) -> int:
    return buffer_stats(data_dir).sinks[0].depth


async def total_requests(service: CloudService) -> int:
    """Return the readings requests the service received, rejected ones included."""
    stats = await service.stats()
    device = stats["devices"].get(DEVICE_ID, {"requests": 0})
    rejected = sum(int(count) for count in stats["unauthenticated"]["rejected"].values())
    return int(device["requests"]) + rejected


async def pending_faults(service: CloudService) -> list[object]:
    async with (
        asyncio.timeout(10),
        httpx.AsyncClient(base_url=service.base_url, timeout=10) as client,
    ):
        response = await client.get("/_test/faults")
    response.raise_for_status()
    return list(response.json()["pending"])


async def wait_until(check: Callable[[], Awaitable[bool]], limit_s: float) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.1)


async def test_outage_and_kill_exactly_once(tmp_path: Path) -> None:
    """A 30 s service outage and a SIGKILL during an upload leave each seq stored exactly once."""
    key_file = tmp_path / "device-key.pem"
    key = generate_key_file(key_file)
    service = CloudService()
    service.register_key(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    simulator = RigSimulator()
    data_dir = tmp_path / "data"
    config = tmp_path / "agent.toml"
    agent = AgentProcess(config, tmp_path / "agent.log")

    async def stored() -> int:
        return int((await service.device_stats(DEVICE_ID))["readings"])

    try:
        service.start()
        await simulator.start(host="127.0.0.1", port=0)
        write_config(config, data_dir, simulator.url, service.base_url, key_file)
        await agent.start()

        async def some_stored() -> bool:
            return await stored() >= 200

        await wait_until(some_stored, 20)

        # (a) The service is away for 30 s while the agent keeps buffering.
        service.stop()
        await asyncio.sleep(OUTAGE_S)
        backlog = cloud_depth(data_dir)
        service.start()
        # The first batch after the outage is stored but its response lost, so it is resent.
        await service.inject_fault(status=503, after_store=True, retry_after=0, count=1)
        before_outage_end = await stored()

        async def caught_up() -> bool:
            return await stored() >= before_outage_end + backlog

        restarted = asyncio.get_running_loop().time()
        await wait_until(caught_up, RECOVERY_TIMEOUT)
        log.info(
            "cloud e2e: backlog of %d uploaded %.1f s after the service restart",
            backlog,
            asyncio.get_running_loop().time() - restarted,
        )

        # (b) A batch is in flight when the agent is killed: the service rejected it
        # with 503 and Retry-After, and the agent is waiting to send it again.
        requests_before = await total_requests(service)
        await service.inject_fault(status=503, retry_after=30, count=1)

        async def fault_used() -> bool:
            return not await pending_faults(service)

        await wait_until(fault_used, 10)
        assert await total_requests(service) > requests_before, "no upload before the kill"
        agent.kill()
        await agent.start()

        await asyncio.sleep(2.0)
        await simulator.stop()

        async def drained() -> bool:
            first = buffer_stats(data_dir)
            await asyncio.sleep(1.0)
            second = buffer_stats(data_dir)
            return second.sinks[0].depth == 0 and second.last_seq == first.last_seq

        await wait_until(drained, 30)
        assert agent.terminate() == 0
        final = buffer_stats(data_dir)
        seqs = [int(row["seq"]) for row in await service.readings(DEVICE_ID)]
        stats = await service.device_stats(DEVICE_ID)
    finally:
        agent.close()
        await simulator.stop()
        service.close()

    log.info(
        "cloud e2e: last_seq %d, %d stored, %d duplicates counted by the service",
        final.last_seq,
        len(seqs),
        stats["duplicates"],
    )
    assert final.sinks[0].depth == 0
    assert final.quarantined == 0
    assert backlog > 0
    missing = sorted(set(range(1, final.last_seq + 1)) - set(seqs))
    assert missing == [], f"{len(missing)} seqs never reached the service"
    assert len(seqs) == len(set(seqs)), "a seq is stored twice"
    assert max(seqs) == final.last_seq
    assert stats["readings"] == final.last_seq
    assert stats["duplicates"] > 0
