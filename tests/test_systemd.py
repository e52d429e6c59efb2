"""Checks of systemd/rig-agent.service with systemd's own tools, and of the agent in its sandbox."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.runtime import SHUTDOWN_BUDGET
from tests.peers import ModbusPeer, Mosquitto, free_port, sim_device, subscriber

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "rig-agent.service"
INSTALLED_BINARY = "/opt/rig-agent/venv/bin/rig-agent"
MAX_EXPOSURE = 3.0
"""Highest `systemd-analyze security` score accepted; systemd rates below 4.0 as OK."""

PR_SET_MDWE = 65
"""prctl(2) option that turns on MDWE (memory-deny-write-execute) for a process."""
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(path).exists():
        pytest.fail(
            "systemd-analyze not found: install the Debian package systemd "
            "(apt-get install systemd) to check the unit file"
        )
    return path


def _run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return subprocess.run(
        [_systemd_analyze(), *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit, with ExecStart= pointing at this checkout's rig-agent so that verify finds it.

    `systemd-analyze verify` rejects a unit whose program does not exist, and
    the tests do not install anything under /opt.
    """
    binary = Path(sys.executable).parent / "rig-agent"
    assert binary.exists(), f"{binary} not found: install the package with pip install -e ."
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return copy


def parse_unit(text: str) -> dict[str, list[str]]:
    """Return every `Section.Key` of a unit file with its values in file order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"unit line without '=': {raw!r}"
        assert not value.endswith("\\"), "continuation lines are not parsed here"
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def seconds(span: str) -> float:
    """Convert a systemd time span of one number and unit (s, min, ms) to seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min)", span)
    assert match, f"unsupported time span {span!r} in the unit: use a form such as 30s"
    number, unit = float(match[1]), match[2]
    return number * {"ms": 0.001, "s": 1.0, "min": 60.0}[unit]


def expand_syscalls(names: list[str], cache: dict[str, set[str]]) -> set[str]:
    """Resolve system call names and @groups to system call names, as systemd-analyze lists them."""
    result: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            result.add(name)
            continue
        if name not in cache:
            listed = _run_analyze("syscall-filter", name)
            assert listed.returncode == 0, listed.stderr
            members = [
                line.strip()
                for line in listed.stdout.splitlines()[1:]
                if line.strip() and not line.strip().startswith("#")
            ]
            cache[name] = expand_syscalls(members, cache)
        result |= cache[name]
    return result


def allowed_syscalls(filters: list[str]) -> set[str]:
    """Apply SystemCallFilter= lines in order, for a unit whose first line is an allow list."""
    assert filters, "the unit has no SystemCallFilter="
    assert not filters[0].startswith("~"), "the first SystemCallFilter= must be an allow list"
    cache: dict[str, set[str]] = {}
    allowed: set[str] = set()
    for entry in filters:
        deny = entry.startswith("~")
        names = expand_syscalls(entry.removeprefix("~").split(), cache)
        allowed = allowed - names if deny else allowed | names
    return allowed


# --- systemd's own checks ---------------------------------------------------------


def test_unit_passes_verify(unit_copy: Path) -> None:
    result = _run_analyze("verify", str(unit_copy))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # verify exits 0 after a setting it ignored, such as a misspelt key, so any output fails.
    assert output == ""


def test_unit_verify_catches_bad_setting(unit_copy: Path) -> None:
    unit_copy.write_text(unit_copy.read_text().replace("ProtectHome=yes", "ProtectHome=yess"))
    result = _run_analyze("verify", str(unit_copy))
    assert "ignoring: yess" in result.stdout + result.stderr


def test_unit_exposure_below_limit(unit_copy: Path) -> None:
    result = _run_analyze("security", "--offline=true", str(unit_copy))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure level in the output of systemd-analyze:\n{result.stdout}"
    exposure = float(match[1])
    assert exposure < MAX_EXPOSURE, result.stdout


# --- settings that the agent depends on -------------------------------------------


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())


def test_unit_notify_and_watchdog(unit: dict[str, list[str]]) -> None:
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert seconds(unit["Service.WatchdogSec"][-1]) >= 10.0
    assert unit["Service.Restart"] == ["always"]
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_unit_stop_timeout_covers_shutdown(unit: dict[str, list[str]]) -> None:
    stop_timeout = seconds(unit["Service.TimeoutStopSec"][-1])
    assert stop_timeout > SHUTDOWN_BUDGET
    assert stop_timeout >= 10.0, "the agent promises to exit within 10 s of SIGTERM"


def test_unit_restarts_never_hit_start_limit(unit: dict[str, list[str]]) -> None:
    restart_delay = seconds(unit["Service.RestartSec"][-1])
    window = seconds(unit["Unit.StartLimitIntervalSec"][-1])
    burst = int(unit["Unit.StartLimitBurst"][-1])
    max_starts = int(window // restart_delay) + 1
    assert max_starts < burst, "automatic restarts alone would stop the unit for good"


def test_unit_directories_and_credentials(unit: dict[str, list[str]]) -> None:
    assert unit["Service.StateDirectory"] == ["rig-agent"]
    assert unit["Service.ConfigurationDirectory"] == ["rig-agent"]
    assert unit["Service.UMask"] == ["0077"]
    credentials = [value.split(":", 1)[0] for value in unit["Service.LoadCredential"]]
    assert credentials == ["device-key.pem", "mqtt-password"]
    assert f"ExecStart={INSTALLED_BINARY} run -c /etc/rig-agent/agent.toml" in UNIT.read_text()


def test_unit_user_and_serial_ports(unit: dict[str, list[str]]) -> None:
    assert unit["Service.User"] == ["rig-agent"]
    assert "dialout" in unit["Service.SupplementaryGroups"][-1].split()
    assert unit.get("Service.PrivateDevices", ["no"]) == ["no"]
    assert unit["Service.DevicePolicy"] == ["closed"]
    assert unit["Service.DeviceAllow"] == ["char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw"]


def test_unit_sandbox_settings(unit: dict[str, list[str]]) -> None:
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expected.items():
        assert unit.get(f"Service.{key}") == [value], key


def test_unit_allows_clock_read_only(unit: dict[str, list[str]]) -> None:
    allowed = allowed_syscalls(unit["Service.SystemCallFilter"])
    # glibc 2.32 and newer implement adjtimex() with clock_adjtime.
    for name in ("adjtimex", "clock_adjtime", "read", "sendto", "ioctl", "flock"):
        assert name in allowed, name
    for name in ("settimeofday", "clock_settime", "mount", "reboot", "init_module", "setuid"):
        assert name not in allowed, name
    # ProtectClock=yes adds a filter that refuses adjtimex even with modes=0.
    assert unit.get("Service.ProtectClock", ["no"]) == ["no"]


# --- the agent under MemoryDenyWriteExecute ---------------------------------------

_MDWE_WRAPPER = f"""
SET, GET, GAIN = {PR_SET_MDWE}, {PR_GET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}
import ctypes, ctypes.util, mmap, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
if libc.prctl(SET, GAIN, 0, 0, 0) != 0 or libc.prctl(GET, 0, 0, 0, 0) != GAIN:
    sys.exit(f"PR_SET_MDWE failed: errno {{ctypes.get_errno()}}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("PR_SET_MDWE is set but a writable executable mapping was allowed")
timex = ctypes.create_string_buffer(512)
if libc.adjtimex(timex) < 0:
    sys.exit(f"adjtimex with modes=0 failed: errno {{ctypes.get_errno()}}")
if ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() != 7:
    sys.exit("a ctypes callback returned the wrong value")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    """Return whether this kernel has PR_SET_MDWE (Linux 6.3 and newer), checked in a child."""
    probe = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        f"sys.exit(0 if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0 "
        "else 1)"
    )
    return subprocess.run([sys.executable, "-c", probe], check=False, timeout=30).returncode == 0


@pytest.mark.e2e
async def test_agent_runs_without_writable_executable_memory(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The agent polls, buffers and publishes with MemoryDenyWriteExecute in force.

    The kernel's PR_SET_MDWE refuses the same mappings as systemd's
    MemoryDenyWriteExecute=yes: writable and executable at once, or made
    executable later. The wrapper also checks the read-only adjtimex call and
    a ctypes callback under that rule before it starts the agent.
    """
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 or newer), so it cannot check")

    modbus_port = free_port()
    peer = ModbusPeer([sim_device(1)], tcp_port=modbus_port)
    await peer.start()
    config = tmp_path / "agent.toml"
    config.write_text(
        "\n".join(
            [
                "[agent]",
                'rig_id = "rig-mdwe"',
                f'data_dir = "{tmp_path / "data"}"',
                'log_format = "json"',
                'metrics_listen = ""',
                "[mqtt]",
                f'url = "{mosquitto.url}"',
                "[[sources.modbus]]",
                'name = "pumps"',
                f'url = "tcp://127.0.0.1:{modbus_port}"',
                "unit_id = 1",
                'poll_interval = "100ms"',
                "[[sources.modbus.points]]",
                'channel = "spp"',
                "address = 0",
                'type = "uint16"',
                'unit = "psi"',
            ]
        )
        + "\n"
    )
    log_path = tmp_path / "agent.log"
    command = [sys.executable, "-c", _MDWE_WRAPPER, sys.executable, "-m", "agent.cli"]
    try:
        async with subscriber(mosquitto.port, "rigs/rig-mdwe/readings/#") as inbox:
            with log_path.open("wb") as out:
                proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
                    [*command, "run", "-c", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
            try:
                async with asyncio.timeout(20):
                    while not inbox.readings():
                        assert proc.poll() is None, log_path.read_text()
                        await asyncio.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=15)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        await peer.stop()

    log = log_path.read_text()
    assert code == 0, log
    assert '"agent_stopped"' in log
    assert inbox.readings()[0]["channel"] == "spp"
