"""Sets of integers kept as sorted closed ranges, for acknowledged and deleted `seq` values."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

__all__ = ["RangeSet"]


class RangeSet:
    """A set of integers stored as sorted, disjoint, non-adjacent closed ranges.

    Adding a range merges it with every range it overlaps or touches, so
    `add(1, 5)` then `add(6, 9)` leaves the single range `(1, 9)`. Every
    operation costs O(log n + k) for n stored ranges and k ranges touched.
    """

    __slots__ = ("_firsts", "_lasts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._firsts: list[int] = []
        self._lasts: list[int] = []
        for first, last in ranges:
            self.add(first, last)

    def __repr__(self) -> str:
        return f"RangeSet({list(self.ranges())!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._firsts == other._firsts and self._lasts == other._lasts

    __hash__ = None  # type: ignore[assignment]  # mutable, like set

    def __bool__(self) -> bool:
        return bool(self._firsts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._firsts, self._lasts, strict=True)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        index = bisect.bisect_right(self._firsts, value) - 1
        return index >= 0 and value <= self._lasts[index]

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """Return the stored ranges as `(first, last)` pairs in ascending order."""
        return tuple(self)

    def copy(self) -> RangeSet:
        """Return an independent copy."""
        result = RangeSet()
        result._firsts = list(self._firsts)
        result._lasts = list(self._lasts)
        return result

    def total(self) -> int:
        """Return the number of integers in the set."""
        return sum(last - first + 1 for first, last in self)

    def add(self, first: int, last: int) -> tuple[int, int]:
        """Add the integers `first` to `last` and return the stored range that now contains them."""
        _check_range(first, last)
        # Ranges that end at first - 1 or later and start at last + 1 or earlier overlap
        # or touch the new one, and they are consecutive in the sorted lists.
        start = bisect.bisect_left(self._lasts, first - 1)
        stop = bisect.bisect_right(self._firsts, last + 1)
        if start < stop:
            first = min(first, self._firsts[start])
            last = max(last, self._lasts[stop - 1])
        self._firsts[start:stop] = [first]
        self._lasts[start:stop] = [last]
        return first, last

    def remove(self, first: int, last: int) -> None:
        """Remove the integers `first` to `last`; integers not in the set are ignored."""
        _check_range(first, last)
        start = bisect.bisect_left(self._lasts, first)
        stop = bisect.bisect_right(self._firsts, last)
        if start >= stop:
            return
        kept_firsts: list[int] = []
        kept_lasts: list[int] = []
        if self._firsts[start] < first:
            kept_firsts.append(self._firsts[start])
            kept_lasts.append(first - 1)
        if self._lasts[stop - 1] > last:
            kept_firsts.append(last + 1)
            kept_lasts.append(self._lasts[stop - 1])
        self._firsts[start:stop] = kept_firsts
        self._lasts[start:stop] = kept_lasts

    def covers(self, first: int, last: int) -> bool:
        """Return whether every integer from `first` to `last` is in the set."""
        _check_range(first, last)
        index = bisect.bisect_right(self._firsts, first) - 1
        return index >= 0 and self._lasts[index] >= last

    def within(self, first: int, last: int) -> RangeSet:
        """Return the part of the set from `first` to `last`; empty when `first > last`."""
        result = RangeSet()
        if first > last:
            return result
        start = bisect.bisect_left(self._lasts, first)
        stop = bisect.bisect_right(self._firsts, last)
        for index in range(start, stop):
            result._firsts.append(max(first, self._firsts[index]))
            result._lasts.append(min(last, self._lasts[index]))
        return result

    def count(self, first: int, last: int) -> int:
        """Return how many integers from `first` to `last` are in the set."""
        return self.within(first, last).total()

    def gaps(self, first: int, last: int) -> RangeSet:
        """Return the integers from `first` to `last` that are not in the set."""
        result = RangeSet()
        if first > last:
            return result
        result._firsts.append(first)
        result._lasts.append(last)
        for range_first, range_last in self.within(first, last):
            result.remove(range_first, range_last)
        return result

    def intersection(self, other: RangeSet) -> RangeSet:
        """Return the integers that are in both sets."""
        result = RangeSet()
        mine = list(self)
        theirs = list(other)
        i = j = 0
        while i < len(mine) and j < len(theirs):
            first = max(mine[i][0], theirs[j][0])
            last = min(mine[i][1], theirs[j][1])
            if first <= last:
                result._firsts.append(first)
                result._lasts.append(last)
            # Step past whichever range ends first, since it cannot meet later ranges.
            if mine[i][1] < theirs[j][1]:
                i += 1
            else:
                j += 1
        return result

    def first(self) -> int | None:
        """Return the smallest integer in the set, or None when it is empty."""
        return self._firsts[0] if self._firsts else None

    def last(self) -> int | None:
        """Return the largest integer in the set, or None when it is empty."""
        return self._lasts[-1] if self._lasts else None


def _check_range(first: int, last: int) -> None:
    if first > last:
        message = f"range {first}..{last} is empty: expected first <= last"
        raise ValueError(message)
