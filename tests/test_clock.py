"""System clock state through adjtimex(2), and wall-clock jump detection."""

from __future__ import annotations

import ctypes
import errno
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import agent.clock
from agent.clock import (
    STA_UNSYNC,
    TIME_ERROR,
    ClockState,
    ClockWatch,
    Timex,
    parse_timex,
    read_clock_state,
)

NTP_PHASE_LIMIT_US = 16_000_000
"""Largest maxerror the Linux kernel reports: it stops growing at 16 s."""

TIMEX_FIELDS = [name for name, _ in Timex._fields_ if not name.startswith("_")]

# Prints sizeof(struct timex), the offset and size of each named field, then the result of a
# read-only adjtimex call, all from the system's own C header.
C_PROGRAM = """
#include <stddef.h>
#include <stdio.h>
#include <sys/timex.h>

int main(void) {
    struct timex t = {0};
    int result = adjtimex(&t);
    printf("sizeof %zu\\n", sizeof t);
OFFSETS
    printf("result %d\\nstatus %d\\nmaxerror %ld\\nesterror %ld\\n",
           result, t.status, (long)t.maxerror, (long)t.esterror);
    return 0;
}
"""


def run_c_reference(tmp_path: Path) -> dict[str, int] | None:
    """Compile and run C_PROGRAM; return its numbers, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    offsets = "\n".join(
        f'    printf("offset.{name} %zu\\nsize.{name} %zu\\n", '
        f"offsetof(struct timex, {name}), sizeof t.{name});"
        for name in TIMEX_FIELDS
    )
    source = tmp_path / "timex.c"
    source.write_text(C_PROGRAM.replace("OFFSETS", offsets))
    binary = tmp_path / "timex"
    subprocess.run([compiler, "-o", str(binary), str(source)], check=True, timeout=60)
    output = subprocess.run([str(binary)], capture_output=True, text=True, check=True, timeout=10)
    values: dict[str, int] = {}
    for line in output.stdout.splitlines():
        key, number = line.split()
        values[key] = int(number)
    return values


@pytest.fixture(scope="module")
def c_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int] | None:
    return run_c_reference(tmp_path_factory.mktemp("timex"))


def test_timex_layout_matches_c_header(c_reference: dict[str, int] | None) -> None:
    """Every named field of the ctypes struct has the offset and size the C compiler gives it."""
    if c_reference is None:
        # No C compiler: check the size that glibc's header gives on 64-bit Linux.
        assert ctypes.sizeof(ctypes.c_long) == 8, "this fallback knows only 64-bit layouts"
        assert ctypes.sizeof(Timex) == 208
        return
    assert ctypes.sizeof(Timex) == c_reference["sizeof"]
    for name in TIMEX_FIELDS:
        field = getattr(Timex, name)
        assert field.offset == c_reference[f"offset.{name}"], name
        assert field.size == c_reference[f"size.{name}"], name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="adjtimex is Linux only")
def test_read_clock_state_matches_c_call(c_reference: dict[str, int] | None) -> None:
    """read_clock_state reports what the same call made from C reports."""
    state = read_clock_state()

    assert state.source == "adjtimex"
    assert isinstance(state.synchronized, bool)
    assert 0 <= state.maxerror_us <= NTP_PHASE_LIMIT_US
    assert 0 <= state.esterror_us <= NTP_PHASE_LIMIT_US
    if c_reference is None:
        return
    expected_sync = c_reference["result"] != TIME_ERROR and not (c_reference["status"] & STA_UNSYNC)
    assert state.synchronized is expected_sync
    assert state.status_bits == c_reference["status"]
    # maxerror grows by up to 500 us per second until NTP resets it, and the two calls
    # are a moment apart.
    assert abs(state.maxerror_us - c_reference["maxerror"]) <= 500_000
    assert abs(state.esterror_us - c_reference["esterror"]) <= 500_000


@pytest.mark.parametrize(
    ("result", "status", "expected"),
    [
        (0, 0x2001, True),  # TIME_OK with STA_PLL and STA_NANO, as under chrony
        (1, 0x0011, True),  # TIME_INS: a leap second is due, the clock is still synchronized
        (0, STA_UNSYNC, False),
        (TIME_ERROR, 0x0001, False),
        (TIME_ERROR, STA_UNSYNC, False),
    ],
)
def test_parse_timex_synchronized(result: int, status: int, expected: bool) -> None:
    timex = Timex(status=status, maxerror=1500, esterror=20)

    state = parse_timex(result, timex)

    assert state.synchronized is expected
    assert state.status_bits == status
    assert state.maxerror_us == 1500
    assert state.esterror_us == 20


def test_read_clock_state_on_other_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")

    state = read_clock_state()

    assert state.synchronized is None
    assert "darwin" in state.source


def test_read_clock_state_rejected_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seccomp filter makes adjtimex fail with EPERM: the state is unknown, with the reason."""

    def rejected(_timex: Any) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(agent.clock, "_load_adjtimex", lambda: rejected)

    state = read_clock_state()

    assert state.synchronized is None
    assert "EPERM" in state.source


class FakeClocks:
    """A wall clock and a monotonic clock that the test moves by hand."""

    def __init__(self) -> None:
        self.wall_s = 1_800_000_000.0
        self.monotonic_s = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall_s += seconds
        self.monotonic_s += seconds

    def wall(self) -> float:
        return self.wall_s

    def monotonic(self) -> float:
        return self.monotonic_s


def counting_reader(states: list[ClockState]) -> tuple[Callable[[], ClockState], list[int]]:
    """Return a read_state that returns `states` in turn (the last one repeated) and its calls."""
    calls = [0]

    def read() -> ClockState:
        index = min(calls[0], len(states) - 1)
        calls[0] += 1
        return states[index]

    return read, calls


SYNCED = ClockState(True, 0x2001, 1000, 10, "adjtimex")
UNSYNCED = ClockState(False, STA_UNSYNC, NTP_PHASE_LIMIT_US, NTP_PHASE_LIMIT_US, "adjtimex")


def make_watch(clocks: FakeClocks, states: list[ClockState]) -> tuple[ClockWatch, list[int]]:
    read, calls = counting_reader(states)
    watch = ClockWatch(1.0, read, state_interval=5.0, wall=clocks.wall, monotonic=clocks.monotonic)
    return watch, calls


def test_watch_detects_forward_and_back_jumps() -> None:
    clocks = FakeClocks()
    watch, _ = make_watch(clocks, [SYNCED])

    first = watch.check()
    clocks.advance(0.1)
    clocks.wall_s += 30.0
    with capture_logs() as logs:
        forward = watch.check()
    clocks.advance(0.1)
    clocks.wall_s -= 7.5
    back = watch.check()

    assert first.jump_s == 0.0
    assert not first.jumped
    assert forward.jumped
    assert forward.jump_s == pytest.approx(30.0)
    assert back.jumped
    assert back.jump_s == pytest.approx(-7.5)
    assert watch.jumps == 2
    jump_logs = [entry for entry in logs if entry["event"] == "clock_jump"]
    assert len(jump_logs) == 1
    assert jump_logs[0]["log_level"] == "warning"
    assert jump_logs[0]["jump_s"] == pytest.approx(30.0)


def test_watch_ignores_drift_within_threshold() -> None:
    clocks = FakeClocks()
    watch, _ = make_watch(clocks, [SYNCED])

    watch.check()
    clocks.advance(60.0)
    clocks.wall_s += 0.9
    result = watch.check()
    clocks.advance(60.0)
    clocks.wall_s -= 0.9
    again = watch.check()

    assert result.jump_s == pytest.approx(0.9)
    assert not result.jumped
    assert not again.jumped
    assert watch.jumps == 0


def test_watch_caches_state_for_interval() -> None:
    clocks = FakeClocks()
    watch, calls = make_watch(clocks, [SYNCED, UNSYNCED])

    with capture_logs() as logs:
        states = [watch.check().synchronized]
        for _ in range(4):
            clocks.advance(1.0)
            states.append(watch.check().synchronized)
        property_value = watch.synchronized
        clocks.advance(1.0)
        after_interval = watch.check()

    assert states == [True] * 5
    assert property_value is True
    assert calls[0] == 2
    assert after_interval.synchronized is False
    assert after_interval.state == UNSYNCED
    assert watch.synchronized is False
    events = [entry["event"] for entry in logs]
    assert events == ["clock_synchronized", "clock_unsynchronized"]


def test_watch_synchronized_before_first_check() -> None:
    clocks = FakeClocks()
    watch, calls = make_watch(clocks, [UNSYNCED])

    assert watch.synchronized is False
    assert watch.synchronized is False
    assert calls[0] == 1


def test_watch_reports_unknown_state() -> None:
    clocks = FakeClocks()
    unknown = ClockState(None, 0, 0, 0, "adjtimex failed with EPERM (Operation not permitted)")
    watch, _ = make_watch(clocks, [unknown])

    with capture_logs() as logs:
        result = watch.check()

    assert result.synchronized is None
    assert logs[0]["event"] == "clock_state_unknown"
    assert "EPERM" in logs[0]["source"]


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan")])
def test_watch_rejects_bad_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold_s"):
        ClockWatch(threshold)


def test_watch_with_real_clocks() -> None:
    """Two checks a moment apart on this machine's clocks see no jump."""
    watch = ClockWatch(1.0)

    first = watch.check()
    second = watch.check()

    assert not first.jumped
    assert not second.jumped
    assert abs(second.jump_s) < 0.1
    assert second.synchronized is read_clock_state().synchronized
