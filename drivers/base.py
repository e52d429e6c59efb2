"""The contract between the agent and a source driver."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from buffer.reading import Reading

__all__ = ["Driver", "Emit"]

Emit = Callable[[Sequence[Reading]], Awaitable[None]]
"""Hands the readings of one poll to the buffer writer."""


class Driver(Protocol):
    """A source: polls or listens, and emits readings until cancelled."""

    name: str

    async def run(self, emit: Emit) -> None:
        """Read the device until cancelled; raise on a failure the driver cannot handle."""
        ...
