"""Summarise a py-spy profile in its `raw` (collapsed stack) format as the top functions.

Record a profile, then summarise it:

    .venv/bin/py-spy record --format raw -o profile.txt --pid PID
    .venv/bin/python -m bench.profile_summary profile.txt --within Buffer._append_sync

Each input line is `frame;frame;...;frame COUNT`, outermost frame first,
and each frame is `function (file:line)`. Line numbers are dropped, so all
samples of one function add up.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import positive_int, print_table

__all__ = ["Profile", "load_profile", "main"]

_LINE_NUMBER = re.compile(r":\d+\)$")


@dataclass
class Profile:
    """Sample counts of a profile: per function on its own and with what it calls."""

    total: int
    self_samples: Counter[str]
    """Samples in which the function was the innermost frame."""
    inclusive_samples: Counter[str]
    """Samples in which the function was anywhere on the stack."""


def _function(frame: str) -> str:
    return _LINE_NUMBER.sub(")", frame.strip())


def load_profile(lines: Iterable[str], within: str = "", *, by_line: bool = False) -> Profile:
    """Count the samples of each function; with `within`, only stacks through that function.

    With `by_line`, each line of a function is counted on its own. Time spent in C
    code, such as an SQLite call, shows on the Python line that called it.
    """
    total = 0
    self_samples: Counter[str] = Counter()
    inclusive_samples: Counter[str] = Counter()
    for line in lines:
        stack_text, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        frames = [frame.strip() for frame in stack_text.split(";")]
        if not by_line:
            frames = [_function(frame) for frame in frames]
        if within:
            positions = [i for i, frame in enumerate(frames) if frame.startswith(within + " ")]
            if not positions:
                continue
            frames = frames[positions[0] :]
        count = int(count_text)
        total += count
        self_samples[frames[-1]] += count
        for frame in set(frames):
            inclusive_samples[frame] += count
    return Profile(total, self_samples, inclusive_samples)


def _rows(counts: Counter[str], total: int, top: int) -> list[dict[str, object]]:
    return [
        {"function": function, "samples": samples, "percent": round(100 * samples / total, 1)}
        for function, samples in counts.most_common(top)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_summary",
        description="Print the functions with the most samples in a py-spy raw profile.",
    )
    parser.add_argument("profile", type=Path, help="file written by `py-spy record --format raw`")
    parser.add_argument(
        "--within",
        default="",
        help="count only stacks that pass through this function, such as Buffer._append_sync",
    )
    parser.add_argument(
        "--lines",
        action="store_true",
        help="count each source line on its own instead of whole functions",
    )
    parser.add_argument(
        "--top", type=positive_int, default=15, help="functions listed per table (default: 15)"
    )
    args = parser.parse_args(argv)

    with args.profile.open(encoding="utf-8") as lines:
        profile = load_profile(lines, args.within, by_line=args.lines)
    if profile.total == 0:
        parser.error(f"no samples in {args.profile} (with --within {args.within!r})")

    scope = f" within {args.within}" if args.within else ""
    columns = [("percent", "%"), ("samples", "samples"), ("function", "function")]
    print(f"{profile.total} samples{scope}")
    print_table(
        "Self time: samples with the function innermost",
        columns,
        _rows(profile.self_samples, profile.total, args.top),
    )
    print_table(
        "Inclusive time: samples with the function anywhere on the stack",
        columns,
        _rows(profile.inclusive_samples, profile.total, args.top),
    )


if __name__ == "__main__":
    main()
