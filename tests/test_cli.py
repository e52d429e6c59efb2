"""The `rig-agent` command line, run as a user would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "cases" / "config"
EXAMPLE = Path(__file__).parents[1] / "config" / "examples" / "agent.toml"
BROKEN = sorted(p for p in CASES.iterdir() if (p / "expected.txt").exists())


def rig_agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_enough_broken_config_cases() -> None:
    """The case folder covers at least six kinds of broken config."""
    assert len(BROKEN) >= 6


@pytest.mark.parametrize("case", BROKEN, ids=[p.name for p in BROKEN])
def test_check_config_rejects_broken_file(case: Path) -> None:
    """`check-config` prints each expected, line-accurate error and exits 1."""
    result = rig_agent("check-config", str(case / "agent.toml"))
    assert result.returncode == 1
    for fragment in (case / "expected.txt").read_text().splitlines():
        if fragment.strip():
            assert fragment in result.stderr


def test_check_config_accepts_example() -> None:
    """`check-config` on the shipped example prints a summary and exits 0."""
    result = rig_agent("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_run_rejects_broken_config(tmp_path: Path) -> None:
    """`run` with a broken config exits 1 before starting anything."""
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nrig_id = "r"\ndata_dir = "{tmp_path}"\nbogus = 1\n')
    result = rig_agent("run", "-c", str(config))
    assert result.returncode == 1
    assert "bogus" in result.stderr
    assert not (tmp_path / "buffer.sqlite3").exists()


@pytest.mark.e2e
def test_demo_publishes(tmp_path: Path) -> None:
    """`rig-agent demo --duration 20` exits 0 and reports readings published to MQTT."""
    result = rig_agent("demo", "--duration", "20", "--data-dir", str(tmp_path), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"(\d+) published to MQTT", result.stdout)
    assert match is not None, result.stdout
    assert int(match.group(1)) > 0


def test_readme_config_example_is_valid(tmp_path: Path) -> None:
    """The TOML example in README.md passes `check-config`, so the docs cannot drift."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    assert blocks, "README.md has no TOML example"
    config = tmp_path / "agent.toml"
    config.write_text(blocks[0])
    result = rig_agent("check-config", str(config))
    assert result.returncode == 0, result.stderr
