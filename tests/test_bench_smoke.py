"""Smoke runs of the benchmark scripts at tiny sizes: each one runs and writes sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(module: str, tmp_path: Path, *options: str, timeout: float = 60) -> dict[str, Any]:
    """Run `python -m bench.MODULE` with options and return the JSON it wrote."""
    output = tmp_path / f"{module}.json"
    command = [sys.executable, "-m", f"bench.{module}", *options, "--json", str(output)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{module} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    assert f"results written to {output}" in done.stdout
    return dict(json.loads(output.read_text()))


def check_machine(result: dict[str, Any]) -> None:
    machine = result["machine"]
    assert machine["cores"] >= 1
    assert machine["python"].startswith("3.")
    assert machine["sqlite"].count(".") == 2
    assert machine["cpu_model"]


def test_bench_buffer_tiny(tmp_path: Path) -> None:
    result = run_script(
        "bench_buffer",
        tmp_path,
        *("--batch-sizes", "1,10", "--readings", "200", "--max-commits", "20"),
        *("--repeat", "1", "--channels", "20", "--dir", str(tmp_path)),
    )
    check_machine(result)
    cases = result["cases"]
    assert [case["batch_size"] for case in cases] == [1, 10]
    assert [case["readings"] for case in cases] == [20, 200]
    for case in cases:
        assert case["buffer_readings_per_s"] > 0
        assert case["raw_readings_per_s"] > 0
        assert case["raw_last_values_readings_per_s"] > 0
        assert case["ratio"] > 0
        assert case["buffer_db_bytes_per_reading"] > 0


def test_bench_modbus_plan_tiny(tmp_path: Path) -> None:
    result = run_script("bench_modbus_plan", tmp_path, "--polls", "3", "--max-gaps", "0,8")
    check_machine(result)
    assert result["map"]["points"] == 300
    per_point, gap0, gap8 = result["strategies"]
    assert per_point["requests_per_poll"] == 300
    assert per_point["addresses_discarded"] == 0
    assert 0 < gap0["requests_per_poll"] < per_point["requests_per_poll"]
    assert gap0["addresses_discarded"] == 0
    assert gap8["requests_per_poll"] <= gap0["requests_per_poll"]
    assert gap8["addresses_discarded"] > 0
    for strategy in result["strategies"]:
        assert strategy["poll_ms_median"] > 0
        assert strategy["wire_bytes_per_poll"] > 0


@pytest.mark.e2e
def test_bench_pipeline_tiny(tmp_path: Path) -> None:
    result = run_script(
        "bench_pipeline",
        tmp_path,
        *("--loads", "20@100ms", "--step-duration", "1s", "--warmup", "500ms"),
        *("--max-rate", "400", "--duration", "1s", "--points-per-source", "10"),
        *("--dir", str(tmp_path)),
    )
    check_machine(result)
    (step,) = result["steps"]
    for run in (step, result["max_rate"]):
        assert run["produced"] > 0
        assert run["delivered_unique"] == run["produced"]
        assert run["missing"] == 0
        assert run["beyond_produced"] == 0
        assert run["delivered_readings_per_s"] > 0
        assert run["cpu_s_per_1000_readings"] > 0
        assert run["peak_rss_bytes"] > 0
        assert run["latency_ms"]["p50_ms"] > 0
        assert run["latency_ms"]["p99_ms"] >= run["latency_ms"]["p50_ms"]
        assert run["agent_exit_code"] == 0
    assert step["sources"] == 2
    assert result["max_rate"]["sources"] == 4
    assert isinstance(result["max_rate"]["target_met"], bool)


@pytest.mark.e2e
def test_bench_drain_tiny(tmp_path: Path) -> None:
    result = run_script(
        "bench_drain",
        tmp_path,
        *("--readings", "2000", "--sources", "2", "--channels-per-source", "10"),
        *("--runs", "cloud+mqtt", "--dir", str(tmp_path)),
    )
    check_machine(result)
    assert result["prefill"]["readings_per_s"] > 0
    (drain,) = result["runs"]
    assert drain["agent_exit_code"] == 0
    cloud = drain["cloud"]
    assert cloud["stored"] == 2000
    assert cloud["complete"] is True
    assert cloud["readings_per_s"] > 0
    assert cloud["requests"] >= 1
    assert cloud["request_bytes_per_reading"] > cloud["gzip_body_bytes_per_reading"] > 0
    assert cloud["json_bytes_per_reading"] > cloud["gzip_body_bytes_per_reading"]
    mqtt = drain["mqtt"]
    assert mqtt["complete"] is True
    assert mqtt["missing"] == 0
    assert mqtt["received"] >= 2000
    assert mqtt["payload_bytes_per_reading"] > 0
