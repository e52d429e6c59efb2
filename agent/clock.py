"""System clock state: NTP synchronization from adjtimex(2), and steps of the wall clock."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog

__all__ = [
    "STATE_INTERVAL",
    "STA_UNSYNC",
    "TIME_ERROR",
    "ClockCheck",
    "ClockState",
    "ClockWatch",
    "Timex",
    "parse_timex",
    "read_clock_state",
]

log = structlog.get_logger(__name__)

TIME_ERROR = 5
"""adjtimex return value: the clock is not synchronized (<sys/timex.h>)."""
STA_UNSYNC = 0x0040
"""Status bit that NTP daemons clear once they have set the clock (<bits/timex.h>)."""
STATE_INTERVAL = 5.0
"""Seconds a ClockWatch reuses one adjtimex reading before it reads the state again."""


class _TimeVal(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class Timex(ctypes.Structure):
    """struct timex of adjtimex(2), as glibc declares it where time_t has the width of long.

    That is every 64-bit Linux, where each `long` field is 8 bytes and the struct
    208, and 32-bit Linux built without 64-bit time_t. The padding after `modes`,
    `status` and `shift` comes from ctypes aligning the next `long`, as a C compiler does.
    """

    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _TimeVal),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        # Eleven unnamed 32-bit fields that the kernel reserves for later use.
        ("_reserved", ctypes.c_int * 11),
    )


@dataclass(frozen=True, slots=True)
class ClockState:
    """Synchronization state of the system clock as the kernel reports it."""

    synchronized: bool | None
    """False when adjtimex returns TIME_ERROR or STA_UNSYNC is set, None when unknown."""
    status_bits: int
    """The `status` field of struct timex (STA_* bits), or 0 when unknown."""
    maxerror_us: int
    """Maximum error of the clock in microseconds, or 0 when unknown."""
    esterror_us: int
    """Estimated error of the clock in microseconds, or 0 when unknown."""
    source: str
    """"adjtimex" when the kernel was read, otherwise why the state is unknown."""


@dataclass(frozen=True, slots=True)
class ClockCheck:
    """The result of one ClockWatch.check."""

    jump_s: float
    """How far the wall clock moved beyond the monotonic clock since the previous check.

    Positive when it stepped forward, negative when back, 0.0 on the first check.
    """
    jumped: bool
    """True when abs(jump_s) exceeds the watch's threshold."""
    synchronized: bool | None
    """The synchronization state, at most the watch's state interval old."""
    state: ClockState


def read_clock_state() -> ClockState:
    """Read the clock's synchronization state with adjtimex(2) in read-only mode.

    Modes 0 changes nothing, so an unprivileged process may call it. Returns a
    state with `synchronized` None, and the reason in `source`, where the call
    is not available: not Linux, no such C library function, or a seccomp
    filter that rejects it.
    """
    if not sys.platform.startswith("linux"):
        return _unknown(f"adjtimex is not available on {sys.platform}")
    try:
        adjtimex = _load_adjtimex()
    except (OSError, AttributeError) as exc:
        return _unknown(f"adjtimex is not available in the C library: {exc}")

    timex = Timex()  # zeroed, so modes is 0
    result = adjtimex(ctypes.byref(timex))
    if result == -1:
        code = ctypes.get_errno()
        name = errno.errorcode.get(code, str(code))
        return _unknown(f"adjtimex failed with {name} ({os.strerror(code)})")
    return parse_timex(result, timex)


@functools.cache
def _load_adjtimex() -> Callable[[Any], int]:
    # The C library is already loaded into the process, so dlopen(NULL) finds it.
    adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
    adjtimex.argtypes = (ctypes.POINTER(Timex),)
    adjtimex.restype = ctypes.c_int
    return cast(Callable[[Any], int], adjtimex)


def parse_timex(result: int, timex: Timex) -> ClockState:
    """Build a ClockState from the return value and struct of a successful adjtimex call."""
    synchronized = result != TIME_ERROR and not timex.status & STA_UNSYNC
    return ClockState(
        synchronized=synchronized,
        status_bits=timex.status,
        maxerror_us=timex.maxerror,
        esterror_us=timex.esterror,
        source="adjtimex",
    )


def _unknown(reason: str) -> ClockState:
    return ClockState(None, 0, 0, 0, reason)


def _boot_time() -> float:
    """Return seconds on a clock that is never stepped and keeps counting in suspend.

    CLOCK_MONOTONIC stops during suspend, so after a resume it would make the
    wall clock look stepped forward by the time asleep. CLOCK_BOOTTIME does not.
    """
    return time.clock_gettime(time.CLOCK_BOOTTIME)


_DEFAULT_MONOTONIC: Callable[[], float] = (
    _boot_time if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic
)


class ClockWatch:
    """Detect steps of the wall clock and track whether it is synchronized.

    Call `check` once per batch of readings. Each call reads the wall and the
    monotonic clock once, and adjtimex only when the cached state is older than
    `state_interval` seconds, so a call costs a few microseconds. Not thread-safe.
    """

    def __init__(
        self,
        threshold_s: float,
        read_state: Callable[[], ClockState] = read_clock_state,
        *,
        state_interval: float = STATE_INTERVAL,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = _DEFAULT_MONOTONIC,
    ) -> None:
        if not threshold_s > 0:
            message = f"threshold_s is {threshold_s}: expected seconds greater than 0"
            raise ValueError(message)
        if not state_interval >= 0:
            message = f"state_interval is {state_interval}: expected 0 or more seconds"
            raise ValueError(message)
        self.threshold_s = threshold_s
        self.state_interval = state_interval
        self._read_state = read_state
        self._wall = wall
        self._monotonic = monotonic
        self._jumps = 0
        self._previous: tuple[float, float] | None = None
        self._state: ClockState | None = None
        self._state_read_at = 0.0

    @property
    def jumps(self) -> int:
        """Number of jumps beyond the threshold seen so far."""
        return self._jumps

    @property
    def synchronized(self) -> bool | None:
        """Whether the clock is synchronized (None when unknown), at most state_interval old."""
        return self._current_state(self._monotonic()).synchronized

    @property
    def state(self) -> ClockState:
        """The clock state, at most state_interval old."""
        return self._current_state(self._monotonic())

    def check(self) -> ClockCheck:
        """Compare the wall clock with the monotonic clock since the previous call.

        A difference beyond the threshold is counted and logged as `clock_jump`.
        """
        monotonic_now = self._monotonic()
        wall_now = self._wall()
        jump_s = 0.0
        if self._previous is not None:
            wall_before, monotonic_before = self._previous
            jump_s = (wall_now - wall_before) - (monotonic_now - monotonic_before)
        self._previous = (wall_now, monotonic_now)

        jumped = abs(jump_s) > self.threshold_s
        if jumped:
            self._jumps += 1
            log.warning(
                "clock_jump",
                jump_s=round(jump_s, 6),
                direction="forward" if jump_s > 0 else "back",
                threshold_s=self.threshold_s,
                jumps=self._jumps,
            )
        state = self._current_state(monotonic_now)
        return ClockCheck(jump_s, jumped, state.synchronized, state)

    def _current_state(self, monotonic_now: float) -> ClockState:
        state = self._state
        if state is not None and monotonic_now - self._state_read_at < self.state_interval:
            return state
        fresh = self._read_state()
        self._state = fresh
        self._state_read_at = monotonic_now
        if state is None or fresh.synchronized != state.synchronized:
            self._log_change(fresh)
        return fresh

    def _log_change(self, state: ClockState) -> None:
        fields = {
            "status_bits": hex(state.status_bits),
            "maxerror_us": state.maxerror_us,
            "esterror_us": state.esterror_us,
            "source": state.source,
        }
        if state.synchronized is None:
            log.warning("clock_state_unknown", **fields)
        elif state.synchronized:
            log.info("clock_synchronized", **fields)
        else:
            log.warning("clock_unsynchronized", **fields)
