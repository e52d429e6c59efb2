"""Failures that tests make the ingest service produce on purpose, through `POST /_test/faults`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from uplink.witsml_doc import parse_time

__all__ = ["Fault", "FaultPlan", "Route"]

Route = Literal["readings", "witsml"]
"""The upload route a request came in on: `POST /v1/readings` or `POST /v1/witsml/logs`."""


class Fault(BaseModel):
    """One injected failure: a status for the next requests, or a 422 for one seq or row time.

    A status fault (`status` set) fails the next `count` upload requests
    (default 1) with that status, before authentication, or after the body
    is stored when `after_store` is true (a lost acknowledgement). It applies
    to both upload routes, or only to the one named by `route`. A seq fault
    (`reject_seq` set) fails every readings request containing that seq with
    422; a row-time fault (`reject_time` set, an xsd:dateTime with a zone)
    fails every WITSML request with a row at that instant with 422. Both last
    `count` requests or, without `count`, until the faults are cleared.
    """

    model_config = ConfigDict(extra="forbid")

    status: int | None = Field(default=None, ge=400, le=599)
    retry_after: int | None = Field(default=None, ge=0, description="Retry-After in seconds")
    count: int | None = Field(default=None, ge=1)
    reject_seq: int | None = Field(default=None, ge=1)
    reject_time: str | None = Field(
        default=None, min_length=1, description="index of a WITSML row, e.g. 2024-05-01T06:00:00Z"
    )
    after_store: bool = False
    route: Route | None = Field(
        default=None, description="the upload route a status fault applies to; null: both"
    )

    @field_validator("reject_time")
    @classmethod
    def _time_with_zone(cls, value: str | None) -> str | None:
        if value is not None:
            parse_time(value)  # its ValueError names the rule the text breaks
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        kinds = [self.status, self.reject_seq, self.reject_time]
        if sum(kind is not None for kind in kinds) != 1:
            msg = "give exactly one of status, reject_seq and reject_time"
            raise ValueError(msg)
        if self.status is None and (
            self.retry_after is not None or self.after_store or self.route is not None
        ):
            msg = "retry_after, after_store and route apply to status faults only"
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
                remaining = None  # a seq or row-time fault without a count lasts until cleared
            self._faults.append((fault, remaining))

    def clear(self) -> None:
        self._faults.clear()

    def take_status(self, route: Route = "readings") -> Fault | None:
        """Use up one request of the oldest status fault for `route` and return it, or None."""
        for position, (fault, remaining) in enumerate(self._faults):
            if fault.status is not None and fault.route in (None, route):
                self._use(position, remaining)
                return fault
        return None

    def take_rejected_seq(self, seqs: Iterable[int]) -> int | None:
        """Return the first seq fault's seq found among `seqs`, using up one of its requests."""
        if all(fault.reject_seq is None for fault, _ in self._faults):
            return None  # No seq fault is pending, as usual: skip building the set.
        batch_seqs = set(seqs)
        for position, (fault, remaining) in enumerate(self._faults):
            if fault.reject_seq is not None and fault.reject_seq in batch_seqs:
                self._use(position, remaining)
                return fault.reject_seq
        return None

    def take_rejected_time(self, times_us: Iterable[int]) -> int | None:
        """Return the first row-time fault's instant (UTC microseconds) found among `times_us`.

        The fault found loses one of its requests.
        """
        row_times = set(times_us)
        for position, (fault, remaining) in enumerate(self._faults):
            if fault.reject_time is None:
                continue
            instant = parse_time(fault.reject_time)
            if instant in row_times:
                self._use(position, remaining)
                return instant
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
