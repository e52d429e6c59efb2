"""Backlog drain: a buffer pre-filled with N readings, drained to the cloud service and MQTT.

The buffer is filled through the buffer API with every sink cursor at 0,
then the agent starts without sources and uploads the backlog to the
reference cloud service (tests/peers.py CloudService) and publishes it to a
private mosquitto. Run from the repository root:

    .venv/bin/python -m bench.bench_drain

Bytes on the wire: HTTP requests pass through a byte-counting proxy in this
process, which sums each request's headers and its `Content-Length` body
(gzip), and also decompresses each body to report the JSON size. MQTT bytes
are the payloads and topics seen by the subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from bench.common import (
    add_json_option,
    code_version,
    cpu_seconds,
    machine_info,
    memory_bytes,
    positive_int,
    print_table,
    quiet_logs,
    start_py_spy,
    write_json,
)
from bench.mqtt_inbox import ReadingInbox, subscribe
from buffer.reading import Quality, Reading, now_us
from buffer.store import DB_FILENAME, Buffer, read_stats
from config.units import parse_duration
from tests.peers import AgentProcess, CloudService, Mosquitto
from uplink.auth import generate_key_file

__all__ = ["CountingProxy", "main"]

RIG_ID = "bench-drain"
DEVICE_ID = "bench-drain-edge"
PREFILL_BATCH = 10_000
"""Readings per append while the buffer is filled."""
POLL_S = 0.5
"""Seconds between two reads of the sink cursors while the agent drains."""
MQTT_PUBLISH_FIXED_BYTES = 5
"""PUBLISH fixed header byte, topic length (2) and packet id (2) of an MQTT 3.1.1 QoS 1 message."""
MQTT_PUBACK_BYTES = 4


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of an HTTP/1.1 server that counts what passes through.

    Requests are parsed only to find their boundaries: each must carry a
    `Content-Length`, as httpx sends with a bytes body.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.requests = 0
        self.request_bytes = 0
        """Every byte sent to the service: request lines, headers and bodies."""
        self.body_bytes = 0
        self.json_bytes = 0
        """Body bytes after undoing a gzip Content-Encoding."""
        self.response_bytes = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_connect(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
            await asyncio.gather(
                self._forward_requests(client_reader, upstream_writer),
                self._forward_responses(upstream_reader, client_writer),
                return_exceptions=True,
            )
        finally:
            self._tasks.discard(task)
            client_writer.close()

    async def _forward_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        pending = bytearray()
        body = bytearray()
        body_left = 0
        gzip_body = False
        try:
            while data := await reader.read(256 * 1024):
                self.request_bytes += len(data)
                writer.write(data)
                await writer.drain()
                pending += data
                while True:
                    if body_left:
                        take = min(body_left, len(pending))
                        body += pending[:take]
                        del pending[:take]
                        body_left -= take
                        if body_left:
                            break
                        self._count_body(bytes(body), gzip_body)
                        body.clear()
                    end = pending.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    headers = _parse_headers(bytes(pending[:end]))
                    del pending[: end + 4]
                    self.requests += 1
                    body_left = int(headers.get("content-length", "0"))
                    gzip_body = headers.get("content-encoding", "").lower() == "gzip"
                    if body_left == 0:
                        self._count_body(b"", gzip_body=False)
        finally:
            writer.close()

    def _count_body(self, body: bytes, gzip_body: bool) -> None:
        self.body_bytes += len(body)
        if gzip_body:
            self.json_bytes += len(zlib.decompress(body, wbits=16 + zlib.MAX_WBITS))
        else:
            self.json_bytes += len(body)

    async def _forward_responses(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(256 * 1024):
                self.response_bytes += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


def _parse_headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        message = f"request {lines[0]!r} uses Transfer-Encoding, which the proxy cannot count"
        raise RuntimeError(message)
    return headers


def make_poll(ts_us: int, source: int, channels: int, values: list[float]) -> list[Reading]:
    """Return one poll of one source: each channel's value after a small random step."""
    readings = []
    for channel in range(channels):
        index = source * channels + channel
        readings.append(
            Reading(
                ts_us=ts_us,
                source=f"device{source:02d}",
                channel=f"ch{channel:03d}",
                value=values[index],
                unit="psi" if channel % 2 == 0 else "spm",
                quality=Quality.GOOD,
            )
        )
    return readings


async def prefill(data_dir: Path, args: argparse.Namespace) -> float:
    """Fill the buffer with `--readings` readings, polls of every source in turn; return seconds.

    Values follow a seeded random walk: even channels have 3 decimals, odd
    channels 1 decimal, as scaled sensor values do.
    """
    rng = random.Random(7)
    per_poll = args.sources * args.channels_per_source
    levels = [rng.uniform(10.0, 5000.0) for _ in range(per_poll)]
    polls = -(-args.readings // per_poll)
    first_ts = now_us() - polls * 1_000_000
    pending: list[Reading] = []
    written = 0
    started = time.perf_counter()
    async with Buffer(data_dir, ["mqtt", "cloud"]) as buffer:
        for poll in range(polls):
            for index in range(per_poll):
                levels[index] += rng.uniform(-1.0, 1.0)
            values = [
                round(level, 3) if index % 2 == 0 else round(level, 1)
                for index, level in enumerate(levels)
            ]
            for source in range(args.sources):
                pending.extend(
                    make_poll(first_ts + poll * 1_000_000, source, args.channels_per_source, values)
                )
            if len(pending) >= PREFILL_BATCH or poll == polls - 1:
                take = pending[: args.readings - written]
                await buffer.append(take)
                written += len(take)
                pending.clear()
                if written >= args.readings:
                    break
        if buffer.last_seq != args.readings:
            message = f"prefill stored seq up to {buffer.last_seq}, expected {args.readings}"
            raise RuntimeError(message)
    return time.perf_counter() - started


def write_config(
    path: Path,
    data_dir: Path,
    sinks: Sequence[str],
    mqtt_port: int,
    cloud_url: str,
    key_file: Path,
    args: argparse.Namespace,
) -> None:
    lines = [
        "[agent]",
        f"rig_id = {json.dumps(RIG_ID)}",
        f"data_dir = {json.dumps(str(data_dir))}",
        'log_format = "json"',
        'metrics_listen = ""',
    ]
    if "mqtt" in sinks:
        lines += [
            "[mqtt]",
            f'url = "mqtt://127.0.0.1:{mqtt_port}"',
            'topic_prefix = "rigs/{rig_id}"',
            "qos = 1",
            f"max_readings_per_message = {args.max_readings_per_message}",
        ]
    if "cloud" in sinks:
        lines += [
            "[cloud]",
            f"url = {json.dumps(cloud_url)}",
            f"device_id = {json.dumps(DEVICE_ID)}",
            f"private_key_file = {json.dumps(str(key_file))}",
            f"batch_max_readings = {args.batch_max_readings}",
            'interval = "1s"',
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class Peers:
    """The cloud service, its proxy, mosquitto and the subscriber's inboxes."""

    service: CloudService
    proxy: CountingProxy
    mosquitto: Mosquitto
    key_file: Path
    inboxes: list[ReadingInbox]


async def drain_run(
    peers: Peers, run_dir: Path, template: Path, sinks: Sequence[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Drain one copy of the pre-filled buffer to `sinks` and return its figures."""
    data_dir = run_dir / "data"
    shutil.copytree(template, data_dir)
    inbox = ReadingInbox(RIG_ID)
    peers.inboxes[:] = [inbox]
    proxy = peers.proxy
    proxy_before = (proxy.requests, proxy.request_bytes, proxy.body_bytes, proxy.json_bytes)
    response_before = proxy.response_bytes
    stored_before = int((await peers.service.device_stats(DEVICE_ID)).get("readings", 0))
    if stored_before:
        message = "the cloud service already contains readings of this device: start a new service"
        raise RuntimeError(message)

    config = run_dir / "agent.toml"
    cloud_url = f"http://127.0.0.1:{proxy.port}"
    write_config(config, data_dir, sinks, peers.mosquitto.port, cloud_url, peers.key_file, args)
    agent = AgentProcess(config, run_dir / "agent.log")
    label = "+".join(sinks)
    print(f"drain to {label}: {args.readings:,} readings", flush=True)
    launched = time.monotonic()
    await agent.start(wait_s=120)
    assert agent.proc is not None
    pid = agent.proc.pid
    profiler = None
    if args.py_spy_dir is not None:
        profiler = start_py_spy(pid, args.py_spy_dir / f"drain-{label}.txt")
    started = time.monotonic()
    cpu_start = cpu_seconds(pid)
    service_pid = peers.service.proc.pid if peers.service.proc is not None else None
    service_cpu_start = cpu_seconds(service_pid) if service_pid else 0.0
    done_at: dict[str, float] = {}
    deadline = started + args.timeout
    try:
        while len(done_at) < len(sinks):
            if time.monotonic() > deadline:
                message = f"drain to {label} timed out after {args.timeout:.0f} s: see {agent.log}"
                raise RuntimeError(message)
            await asyncio.sleep(POLL_S)
            cursors = {s.name: s.cursor for s in read_stats(data_dir, list(sinks)).sinks}
            for sink in sinks:
                if sink not in done_at and cursors.get(sink, 0) >= args.readings:
                    done_at[sink] = time.monotonic()
                    print(f"  {sink} done after {done_at[sink] - started:.1f} s", flush=True)
        finished = time.monotonic()
        agent_cpu = cpu_seconds(pid) - cpu_start
        service_cpu = (cpu_seconds(service_pid) - service_cpu_start) if service_pid else 0.0
        memory = memory_bytes(pid)
        exit_code = agent.terminate(timeout=15)
        if profiler is not None:
            profiler.wait(timeout=60)
    finally:
        agent.close()

    result: dict[str, Any] = {
        "sinks": label,
        "readings": args.readings,
        "startup_s": round(started - launched, 2),
        "drain_s": round(finished - started, 2),
        "agent_cpu_s": round(agent_cpu, 2),
        "cpu_s_per_1000_readings": round(1000 * agent_cpu / args.readings, 4),
        "peak_rss_bytes": memory.get("peak_rss"),
        "agent_exit_code": exit_code,
    }
    if "cloud" in sinks:
        result["cloud"] = await cloud_figures(peers, args, started, done_at["cloud"], proxy_before)
        result["cloud"]["response_bytes"] = proxy.response_bytes - response_before
        result["cloud"]["service_cpu_s"] = round(service_cpu, 2)
    if "mqtt" in sinks:
        async with asyncio.timeout(30):
            await inbox.wait_for_all(args.readings)
        result["mqtt"] = mqtt_figures(inbox, args, started, done_at["mqtt"])
    return result


async def cloud_figures(
    peers: Peers,
    args: argparse.Namespace,
    started: float,
    done: float,
    proxy_before: tuple[int, int, int, int],
) -> dict[str, Any]:
    proxy = peers.proxy
    requests = proxy.requests - proxy_before[0]
    request_bytes = proxy.request_bytes - proxy_before[1]
    body_bytes = proxy.body_bytes - proxy_before[2]
    json_bytes = proxy.json_bytes - proxy_before[3]
    stats = await peers.service.device_stats(DEVICE_ID)
    readings = args.readings
    return {
        "readings_per_s": round(readings / (done - started), 1),
        "seconds": round(done - started, 2),
        "stored": stats.get("readings"),
        "min_seq": stats.get("min_seq"),
        "max_seq": stats.get("max_seq"),
        "duplicates": stats.get("duplicates"),
        "requests": requests,
        "request_bytes_per_reading": round(request_bytes / readings, 2),
        "gzip_body_bytes_per_reading": round(body_bytes / readings, 2),
        "json_bytes_per_reading": round(json_bytes / readings, 2),
        "header_bytes_per_request": round((request_bytes - body_bytes) / requests, 1)
        if requests
        else None,
        "complete": stats.get("readings") == readings
        and stats.get("min_seq") == 1
        and stats.get("max_seq") == readings,
    }


def mqtt_figures(
    inbox: ReadingInbox, args: argparse.Namespace, started: float, done: float
) -> dict[str, Any]:
    readings = args.readings
    # Calculated, not captured: each PUBLISH adds its fixed header, remaining length
    # (2 or 3 bytes at these sizes), topic and packet id, and each PUBACK 4 bytes.
    average = inbox.payload_bytes / inbox.messages if inbox.messages else 0
    length_bytes = 2 if average < 16_384 else 3
    packet_bytes = (
        inbox.payload_bytes
        + inbox.topic_bytes
        + inbox.messages * (MQTT_PUBLISH_FIXED_BYTES + length_bytes + MQTT_PUBACK_BYTES)
    )
    return {
        "readings_per_s": round(readings / (done - started), 1),
        "seconds": round(done - started, 2),
        "messages": inbox.messages,
        "received": inbox.received,
        "duplicates": inbox.duplicates,
        "missing": inbox.missing_count(readings),
        "payload_bytes_per_reading": round(inbox.payload_bytes / readings, 2),
        "packet_bytes_per_reading_calculated": round(packet_bytes / readings, 2),
        "complete": inbox.missing_count(readings) == 0 and inbox.beyond(readings) == 0,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-drain-") as name:
        root = Path(name)
        template = root / "template"
        print(f"filling the buffer with {args.readings:,} readings", flush=True)
        prefill_s = await prefill(template, args)
        db_bytes = sum(
            (template / f"{DB_FILENAME}{suffix}").stat().st_size
            for suffix in ("", "-wal")
            if (template / f"{DB_FILENAME}{suffix}").exists()
        )
        print(f"  filled in {prefill_s:.1f} s, {db_bytes / 1024**2:.0f} MiB", flush=True)

        runs: list[dict[str, Any]] = []
        for number, sinks in enumerate(args.runs):
            run_dir = root / f"run{number}"
            run_dir.mkdir()
            runs.append(await run_with_peers(run_dir, template, sinks, args))

    return {
        "benchmark": "bench_drain",
        "machine": machine,
        "code": code_version(),
        "settings": {
            "readings": args.readings,
            "sources": args.sources,
            "channels_per_source": args.channels_per_source,
            "batch_max_readings": args.batch_max_readings,
            "max_readings_per_message": args.max_readings_per_message,
        },
        "prefill": {
            "seconds": round(prefill_s, 2),
            "readings_per_s": round(args.readings / prefill_s, 1),
            "db_bytes": db_bytes,
            "db_bytes_per_reading": round(db_bytes / args.readings, 1),
        },
        "runs": runs,
    }


async def run_with_peers(
    run_dir: Path, template: Path, sinks: Sequence[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Start a fresh cloud service, proxy and mosquitto for one run, and drain."""
    key_file = run_dir / "device-key.pem"
    key = generate_key_file(key_file)
    service = CloudService(test_faults=False)
    mosquitto = Mosquitto()
    proxy: CountingProxy | None = None
    try:
        service.register_key(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        service.start()
        mosquitto.start()
        proxy = CountingProxy(service.port)
        await proxy.start()
        peers = Peers(service, proxy, mosquitto, key_file, [])
        async with subscribe(mosquitto.port, peers.inboxes):
            return await drain_run(peers, run_dir, template, sinks, args)
    finally:
        if proxy is not None:
            await proxy.stop()
        mosquitto.close()
        with contextlib.suppress(OSError):
            service.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_drain",
        description=(
            "Measure how fast the agent drains a pre-filled buffer to the cloud service "
            "and to MQTT, and the bytes on the wire per reading."
        ),
    )
    parser.add_argument(
        "--readings",
        type=positive_int,
        default=5_000_000,
        help="readings in the pre-filled buffer (default: 5000000)",
    )
    parser.add_argument(
        "--runs",
        default="cloud+mqtt",
        help="comma-separated drains, each a +-joined set of sinks from cloud and mqtt, "
        "each from its own copy of the buffer (default: cloud+mqtt)",
    )
    parser.add_argument(
        "--sources", type=positive_int, default=5, help="sources in the buffer (default: 5)"
    )
    parser.add_argument(
        "--channels-per-source",
        type=positive_int,
        default=100,
        help="channels of each source (default: 100)",
    )
    parser.add_argument(
        "--batch-max-readings",
        type=positive_int,
        default=5000,
        help="the agent's cloud.batch_max_readings (default: 5000, as in the config)",
    )
    parser.add_argument(
        "--max-readings-per-message",
        type=positive_int,
        default=500,
        help="the agent's mqtt.max_readings_per_message (default: 500, as in the config)",
    )
    parser.add_argument(
        "--timeout",
        type=parse_duration,
        default=3600.0,
        help="maximum time one drain may take before the run fails (default: 1h)",
    )
    parser.add_argument(
        "--py-spy-dir",
        type=Path,
        default=None,
        help="record a py-spy profile (raw format) of the agent during each drain into this folder",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder for the temporary work folder (default: the system temporary folder)",
    )
    add_json_option(parser, "bench_drain")
    args = parser.parse_args(argv)
    runs: list[list[str]] = []
    for part in args.runs.split(","):
        sinks = [sink.strip() for sink in part.split("+")]
        if not sinks or any(sink not in ("cloud", "mqtt") for sink in sinks):
            parser.error(f"--runs part {part!r} is invalid: expected cloud, mqtt or cloud+mqtt")
        runs.append(sinks)
    args.runs = runs
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logs()
    result = asyncio.run(run(args))
    rows = []
    for drain in result["runs"]:
        for sink in ("cloud", "mqtt"):
            figures = drain.get(sink)
            if figures is None:
                continue
            wire = (
                figures["request_bytes_per_reading"]
                if sink == "cloud"
                else figures["payload_bytes_per_reading"]
            )
            rows.append(
                {
                    "run": drain["sinks"],
                    "sink": sink,
                    "readings": drain["readings"],
                    "seconds": figures["seconds"],
                    "rate": figures["readings_per_s"],
                    "wire": wire,
                    "complete": figures["complete"],
                    "cpu": drain["cpu_s_per_1000_readings"],
                    "peak_rss_mib": round(drain["peak_rss_bytes"] / 1024**2, 1),
                }
            )
    print_table(
        "Backlog drain (cloud: request bytes incl. headers, gzip body; mqtt: payload bytes)",
        [
            ("run", "run"),
            ("sink", "sink"),
            ("readings", "readings"),
            ("seconds", "seconds"),
            ("rate", "readings/s"),
            ("wire", "bytes/reading"),
            ("complete", "complete"),
            ("cpu", "agent CPU s/1000"),
            ("peak_rss_mib", "peak RSS MiB"),
        ],
        rows,
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
