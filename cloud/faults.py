"""Failures that tests make the ingest service produce on purpose, through `POST /_test/faults`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Fault", "FaultPlan"]


class Fault(BaseModel):
    """One injected failure: a status for the next requests, or a 422 for one seq.

    A status fault (`status` set) fails the next `count` readings requests
    (default 1) with that status, before authentication, or after the batch
    is stored when `after_store` is true (a lost acknowledgement). A seq fault
    (`reject_seq` set) fails every request containing that seq with 422, `count`
    times or, without `count`, until the faults are cleared.
    """

    model_config = ConfigDict(extra="forbid")

    status: int | None = Field(default=None, ge=400, le=599)
    retry_after: int | None = Field(default=None, ge=0, description="Retry-After in seconds")
    count: int | None = Field(default=None, ge=1)
    reject_seq: int | None = Field(default=None, ge=1)
    after_store: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.status is None) == (self.reject_seq is None):
            msg = "give exactly one of status and reject_seq"
            raise ValueError(msg)
        if self.reject_seq is not None and (self.retry_after is not None or self.after_store):
            msg = "retry_after and after_store apply to status faults only"
            raise ValueError(msg)
        return self


class FaultPlan:
    """The faults still to apply, in the order they were added."""

    def __init__(self) -> None:
        self._faults: list[tuple[Fault, int | None]] = []

    def add(self, faults: Iterable[Fault]) -> None:
        for fault in faults:
            remaining: int | None
            if fault.count is not None:
                remaining = fault.count
            elif fault.status is not None:
                remaining = 1
            else:
                remaining = None  # a seq fault without a count lasts until cleared
            self._faults.append((fault, remaining))

    def clear(self) -> None:
        self._faults.clear()

    def take_status(self) -> Fault | None:
        """Use up one request of the oldest status fault and return it, or None."""
        for position, (fault, remaining) in enumerate(self._faults):
            if fault.status is not None:
                self._use(position, remaining)
                return fault
        return None

    def take_rejected_seq(self, seqs: Iterable[int]) -> int | None:
        """Return the first seq fault's seq found among `seqs`, using up one of its requests."""
        batch_seqs = set(seqs)
        for position, (fault, remaining) in enumerate(self._faults):
            if fault.reject_seq is not None and fault.reject_seq in batch_seqs:
                self._use(position, remaining)
                return fault.reject_seq
        return None

    def pending(self) -> list[dict[str, Any]]:
        """Return the faults still to apply, with the requests left for each (null: unlimited)."""
        return [
            {**fault.model_dump(exclude_none=True), "remaining": remaining}
            for fault, remaining in self._faults
        ]

    def _use(self, position: int, remaining: int | None) -> None:
        fault, _ = self._faults[position]
        if remaining is None:
            return
        if remaining <= 1:
            del self._faults[position]
        else:
            self._faults[position] = (fault, remaining - 1)
