"""End-to-end throughput of the agent: Modbus TCP in, SQLite buffer, MQTT QoS 1 out.

A pymodbus server process serves the points, a private mosquitto carries
the messages, and a subscriber in this process checks every seq. The agent
runs as a child process (`rig-agent run -c FILE`) once per load step. Run
from the repository root:

    .venv/bin/python -m bench.bench_pipeline

Each step polls CHANNELS points every INTERVAL, waits `--warmup` seconds,
then measures for `--step-duration` seconds: readings delivered, agent CPU
(from /proc/PID/stat), peak RSS (VmHWM) and latency from each reading's
`ts` to its receipt by the subscriber. After the window the agent is
stopped and restarted without sources, so that it publishes what it still
held, and the subscriber must then have every seq from 1 to the last one
the buffer gave out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from bench.modbus_server import pipeline_points, start_process, stop_process
from bench.mqtt_inbox import ReadingInbox, subscribe
from buffer.store import read_stats
from config.units import format_duration, parse_duration
from tests.peers import AgentProcess, Mosquitto, free_port

__all__ = ["Load", "main", "parse_loads"]

TARGET_SHARE = 0.99
"""Share of the target rate that the delivered rate must reach for the max-rate target to count
as met. The window edges can cut at most one poll, well under 1% of a 60 s window."""
DRAIN_MIN_S = 30.0
DRAIN_READINGS_PER_S = 5000.0
"""Slowest drain rate allowed for the readings still buffered after a step, before it fails."""


@dataclass(frozen=True)
class Load:
    """A poll load: `channels` points read every `interval` seconds."""

    channels: int
    interval: float

    @property
    def rate(self) -> float:
        """Readings per second the load produces when no poll overruns."""
        return self.channels / self.interval

    @property
    def label(self) -> str:
        return f"{self.channels}@{format_duration(self.interval)}"


def parse_loads(text: str) -> list[Load]:
    """Parse "500@1s,1000@100ms" into loads; raise ValueError naming the bad part."""
    loads = []
    for part in text.split(","):
        channels_text, _, interval_text = part.strip().partition("@")
        try:
            channels = int(channels_text)
            interval = parse_duration(interval_text)
        except ValueError:
            message = f"load {part!r} is invalid: expected CHANNELS@INTERVAL such as 500@1s"
            raise ValueError(message) from None
        if channels < 1 or interval <= 0:
            message = f"load {part!r} is invalid: expected at least 1 channel and an interval > 0"
            raise ValueError(message)
        loads.append(Load(channels, interval))
    return loads


def toml_string(value: str) -> str:
    return json.dumps(value)


def write_agent_config(
    path: Path,
    *,
    data_dir: Path,
    rig_id: str,
    mqtt_port: int,
    sources: Sequence[tuple[int, int]],
    interval: float,
    args: argparse.Namespace,
) -> None:
    """Write an agent config; `sources` pairs each Modbus server port with its point count."""
    lines = [
        "[agent]",
        f"rig_id = {toml_string(rig_id)}",
        f"data_dir = {toml_string(str(data_dir))}",
        'log_format = "json"',
        f"log_level = {toml_string(args.log_level)}",
        'metrics_listen = ""',
        "[buffer]",
        f"commit_interval = {toml_string(format_duration(args.commit_interval))}",
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{mqtt_port}"',
        'topic_prefix = "rigs/{rig_id}"',
        "qos = 1",
    ]
    for number, (port, count) in enumerate(sources):
        lines += [
            "[[sources.modbus]]",
            f'name = "device{number:02d}"',
            f'url = "tcp://127.0.0.1:{port}"',
            "unit_id = 1",
            f"poll_interval = {toml_string(format_duration(interval))}",
            'timeout = "1s"',
        ]
        for point in pipeline_points(count):
            lines += [
                "[[sources.modbus.points]]",
                f"channel = {toml_string(point['channel'])}",
                f"table = {toml_string(point['table'])}",
                f"address = {point['address']}",
                f"type = {toml_string(point['type'])}",
                f"unit = {toml_string(point['unit'])}",
            ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def split_channels(channels: int, per_source: int) -> list[int]:
    """Return the point count of each source: full sources of `per_source`, then the rest."""
    counts = [per_source] * (channels // per_source)
    if channels % per_source:
        counts.append(channels % per_source)
    return counts


def machine_cpu_ticks() -> tuple[int, int]:
    """Return (busy, total) CPU ticks of the whole machine from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass
class Snapshot:
    """Counters read at one edge of a measurement window."""

    wall: float
    cpu: dict[str, float]
    machine: tuple[int, int]
    last_seq: int


class Bench:
    """The peers shared by every step: Modbus server process, mosquitto and the subscriber."""

    def __init__(self, args: argparse.Namespace, root: Path, mosquitto: Mosquitto) -> None:
        self.args = args
        self.root = root
        self.mosquitto = mosquitto
        self.inboxes: list[ReadingInbox] = []
        self.ports: list[int] = []
        self.server: subprocess.Popen[bytes] | None = None

    def start_server(self, sources: int) -> None:
        self.ports = [free_port() for _ in range(sources)]
        self.server = start_process(self.ports, points=self.args.points_per_source)

    def stop_server(self) -> None:
        if self.server is not None:
            stop_process(self.server)
            self.server = None

    def pids(self, agent_pid: int) -> dict[str, int]:
        pids = {"agent": agent_pid, "bench": os.getpid()}
        if self.mosquitto.proc is not None:
            pids["mosquitto"] = self.mosquitto.proc.pid
        if self.server is not None:
            pids["modbus_server"] = self.server.pid
        return pids

    def snapshot(self, agent_pid: int, data_dir: Path) -> Snapshot:
        return Snapshot(
            wall=time.monotonic(),
            cpu={name: cpu_seconds(pid) for name, pid in self.pids(agent_pid).items()},
            machine=machine_cpu_ticks(),
            last_seq=read_stats(data_dir, ["mqtt"]).last_seq,
        )

    async def run_step(self, number: int, name: str, load: Load, duration: float) -> dict[str, Any]:
        """Run one load step and return its figures."""
        args = self.args
        step_dir = self.root / f"step{number}"
        step_dir.mkdir()
        data_dir = step_dir / "data"
        config = step_dir / "agent.toml"
        rig_id = f"bench{number}"
        inbox = ReadingInbox(rig_id)
        self.inboxes.append(inbox)

        counts = split_channels(load.channels, args.points_per_source)
        sources = list(zip(self.ports, counts, strict=False))
        write_agent_config(
            config,
            data_dir=data_dir,
            rig_id=rig_id,
            mqtt_port=self.mosquitto.port,
            sources=sources,
            interval=load.interval,
            args=args,
        )

        agent = AgentProcess(config, step_dir / "agent.log")
        print(f"step {name}: {load.label}, target {load.rate:,.0f} readings/s", flush=True)
        try:
            await agent.start()
            assert agent.proc is not None
            pid = agent.proc.pid
            await asyncio.sleep(args.warmup)

            profiler = self.start_profiler(pid, name, duration)
            before = self.snapshot(pid, data_dir)
            inbox.measuring = True
            await asyncio.sleep(duration)
            inbox.measuring = False
            after = self.snapshot(pid, data_dir)
            memory = memory_bytes(pid)

            exit_code = agent.terminate(timeout=15)
            if profiler is not None:
                profiler.wait(timeout=60)
            produced = read_stats(data_dir, ["mqtt"]).last_seq
            backlog_at_stop = produced - inbox.unique

            drain_s = await self.drain(agent, config, data_dir, rig_id, inbox, produced)
        finally:
            agent.close()
        return self.step_result(
            name, load, inbox, before, after, memory, produced, backlog_at_stop, drain_s, exit_code
        )

    def start_profiler(
        self, pid: int, name: str, duration: float
    ) -> subprocess.Popen[bytes] | None:
        """Start py-spy on the agent for the window when --py-spy-dir is given."""
        folder: Path | None = self.args.py_spy_dir
        if folder is None:
            return None
        return start_py_spy(pid, folder / f"pipeline-{name}.txt", duration)

    async def drain(
        self,
        agent: AgentProcess,
        config: Path,
        data_dir: Path,
        rig_id: str,
        inbox: ReadingInbox,
        produced: int,
    ) -> float:
        """Restart the agent without sources until the subscriber has every seq up to `produced`."""
        write_agent_config(
            config,
            data_dir=data_dir,
            rig_id=rig_id,
            mqtt_port=self.mosquitto.port,
            sources=[],
            interval=1.0,
            args=self.args,
        )
        started = time.monotonic()
        limit = max(DRAIN_MIN_S, (produced - inbox.unique) / DRAIN_READINGS_PER_S)
        await agent.start()
        try:
            async with asyncio.timeout(limit):
                await inbox.wait_for_all(produced)
        except TimeoutError:
            missing = inbox.missing_count(produced)
            message = (
                f"drain timed out after {limit:.0f} s: {missing} of {produced} readings "
                f"missing, first {inbox.missing(produced)}; see {agent.log}"
            )
            raise RuntimeError(message) from None
        drained = time.monotonic() - started
        agent.terminate(timeout=15)
        return drained

    def step_result(
        self,
        name: str,
        load: Load,
        inbox: ReadingInbox,
        before: Snapshot,
        after: Snapshot,
        memory: dict[str, int],
        produced: int,
        backlog_at_stop: int,
        drain_s: float,
        exit_code: int,
    ) -> dict[str, Any]:
        window = after.wall - before.wall
        delivered = inbox.window_readings
        agent_cpu = after.cpu["agent"] - before.cpu["agent"]
        busy = after.machine[0] - before.machine[0]
        total = after.machine[1] - before.machine[1]
        cores = os.cpu_count() or 1
        ours = sum(after.cpu[name] - before.cpu[name] for name in after.cpu)
        busy_percent = 100 * busy / total if total else 0.0
        return {
            "name": name,
            "load": load.label,
            "channels": load.channels,
            "poll_interval_s": load.interval,
            "sources": len(split_channels(load.channels, self.args.points_per_source)),
            "target_readings_per_s": round(load.rate, 1),
            "window_s": round(window, 2),
            "produced_readings_per_s": round((after.last_seq - before.last_seq) / window, 1),
            "delivered_readings_per_s": round(delivered / window, 1),
            "delivered_in_window": delivered,
            "cpu_s_per_1000_readings": round(1000 * agent_cpu / delivered, 4)
            if delivered
            else None,
            "agent_cpu_percent_of_one_core": round(100 * agent_cpu / window, 1),
            "cpu_percent_of_one_core": {
                process: round(100 * (after.cpu[process] - before.cpu[process]) / window, 1)
                for process in after.cpu
            },
            "machine_busy_percent_of_all_cores": round(busy_percent, 1),
            "other_processes_percent_of_all_cores": round(
                max(0.0, busy_percent - 100 * ours / window / cores), 1
            ),
            "cores": cores,
            "peak_rss_bytes": memory.get("peak_rss"),
            "rss_bytes": memory.get("rss"),
            "latency_ms": inbox.latency.summary(),
            "produced": produced,
            "delivered_unique": inbox.unique,
            "duplicates": inbox.duplicates,
            "missing": inbox.missing_count(produced),
            "beyond_produced": inbox.beyond(produced),
            "backlog_at_stop": backlog_at_stop,
            "drain_s": round(drain_s, 2),
            "agent_exit_code": exit_code,
        }


def summary_row(step: dict[str, Any]) -> dict[str, Any]:
    latency = step["latency_ms"]
    peak = step["peak_rss_bytes"]
    return {
        "name": step["name"],
        "target": step["target_readings_per_s"],
        "produced": step["produced_readings_per_s"],
        "delivered": step["delivered_readings_per_s"],
        "cpu_per_1000": step["cpu_s_per_1000_readings"],
        "cpu_percent": step["agent_cpu_percent_of_one_core"],
        "peak_rss_mib": round(peak / 1024**2, 1) if peak else None,
        "p50": latency["p50_ms"],
        "p99": latency["p99_ms"],
        "missing": step["missing"],
        "duplicates": step["duplicates"],
        "others": step["other_processes_percent_of_all_cores"],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    steps_plan = [(load.label, load, args.step_duration) for load in args.loads]
    max_load = None
    if args.max_rate:
        channels = max(1, round(args.max_rate * args.max_rate_interval))
        max_load = Load(channels, args.max_rate_interval)
        steps_plan.append(("max-rate", max_load, args.duration))
    max_sources = max(
        len(split_channels(load.channels, args.points_per_source)) for _, load, _ in steps_plan
    )

    machine = machine_info()
    mosquitto = Mosquitto()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-pipeline-") as name:
        root = Path(name)
        bench = Bench(args, root, mosquitto)
        steps: list[dict[str, Any]] = []
        try:
            mosquitto.start()
            bench.start_server(max_sources)
            async with subscribe(mosquitto.port, bench.inboxes):
                for number, (label, load, duration) in enumerate(steps_plan):
                    steps.append(await bench.run_step(number, label, load, duration))
        finally:
            bench.stop_server()
            mosquitto.close()
            if args.keep_dir is not None:
                shutil.copytree(root, args.keep_dir, dirs_exist_ok=True)

    result: dict[str, Any] = {
        "benchmark": "bench_pipeline",
        "machine": machine,
        "code": code_version(),
        "settings": {
            "loads": [load.label for load in args.loads],
            "step_duration_s": args.step_duration,
            "warmup_s": args.warmup,
            "points_per_source": args.points_per_source,
            "commit_interval_s": args.commit_interval,
            "log_level": args.log_level,
            "max_rate": args.max_rate,
            "max_rate_interval_s": args.max_rate_interval,
            "duration_s": args.duration,
        },
        "steps": [step for step in steps if step["name"] != "max-rate"],
        "max_rate": None,
    }
    if max_load is not None:
        max_step = steps[-1]
        met = (
            max_step["delivered_readings_per_s"] >= TARGET_SHARE * args.max_rate
            and max_step["missing"] == 0
        )
        result["max_rate"] = {**max_step, "target_met": met}
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_pipeline",
        description=(
            "Measure readings/s, CPU, RSS and latency of the agent from Modbus TCP to an "
            "MQTT subscriber, at several poll loads and at a sustained maximum rate."
        ),
    )
    parser.add_argument(
        "--loads",
        default="500@1s,2000@1s,1000@100ms,2500@100ms",
        help="comma-separated CHANNELS@INTERVAL steps (default: 500@1s,2000@1s,1000@100ms,"
        "2500@100ms)",
    )
    parser.add_argument(
        "--step-duration",
        type=parse_duration,
        default=30.0,
        help="measured window of each load step, such as 30s (default: 30s)",
    )
    parser.add_argument(
        "--warmup",
        type=parse_duration,
        default=5.0,
        help="time after the agent starts before each window, such as 5s (default: 5s)",
    )
    parser.add_argument(
        "--max-rate",
        type=int,
        default=50_000,
        help="readings/s of the sustained run; 0 skips it (default: 50000)",
    )
    parser.add_argument(
        "--max-rate-interval",
        type=parse_duration,
        default=0.1,
        help="poll interval of the sustained run; channels = rate x interval (default: 100ms)",
    )
    parser.add_argument(
        "--duration",
        type=parse_duration,
        default=60.0,
        help="measured window of the sustained run, such as 60s (default: 60s)",
    )
    parser.add_argument(
        "--points-per-source",
        type=positive_int,
        default=500,
        help="points per Modbus device; each device has its own server port (default: 500)",
    )
    parser.add_argument(
        "--commit-interval",
        type=parse_duration,
        default=0.1,
        help="the agent's buffer.commit_interval (default: 100ms, as in the config)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="the agent's log_level (default: info)",
    )
    parser.add_argument(
        "--py-spy-dir",
        type=Path,
        default=None,
        help="record a py-spy profile (raw format) of the agent in each window into this folder",
    )
    parser.add_argument(
        "--keep-dir",
        type=Path,
        default=None,
        help="copy the work folder (agent configs, logs, buffers) here at the end",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder for the temporary work folder (default: the system temporary folder)",
    )
    add_json_option(parser, "bench_pipeline")
    args = parser.parse_args(argv)
    try:
        args.loads = parse_loads(args.loads)
    except ValueError as exc:
        parser.error(f"--loads: {exc}")
    if args.max_rate < 0:
        parser.error(f"--max-rate {args.max_rate} is invalid: expected 0 or more readings/s")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logs()
    result = asyncio.run(run(args))
    rows = [summary_row(step) for step in result["steps"]]
    if result["max_rate"] is not None:
        rows.append(summary_row(result["max_rate"]))
    print_table(
        "Modbus TCP -> agent -> MQTT QoS 1 subscriber (readings/s, agent CPU, latency in ms)",
        [
            ("name", "step"),
            ("target", "target/s"),
            ("produced", "produced/s"),
            ("delivered", "delivered/s"),
            ("cpu_per_1000", "CPU s/1000"),
            ("cpu_percent", "CPU % core"),
            ("peak_rss_mib", "peak RSS MiB"),
            ("p50", "p50 ms"),
            ("p99", "p99 ms"),
            ("missing", "missing"),
            ("duplicates", "dups"),
            ("others", "other procs %"),
        ],
        rows,
    )
    if result["max_rate"] is not None:
        met = "met" if result["max_rate"]["target_met"] else "NOT met"
        print(f"sustained {args.max_rate:,} readings/s for {args.duration:.0f} s: {met}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
