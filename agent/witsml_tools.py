"""The `rig-agent witsml` commands: check WITSML 1.4.1.1 log files."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from uplink.witsml_doc import Problem, check_log_document, schema_problems

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_UNREADABLE",
    "XSD_DIR_VARIABLE",
    "add_witsml_arguments",
    "run_validate",
    "run_witsml_command",
]

EXIT_OK = 0
EXIT_PROBLEMS = 1
"""Exit code for a file with problems, and for invalid arguments."""
EXIT_UNREADABLE = 2
"""Exit code for a file or schema folder that cannot be read."""

XSD_DIR_VARIABLE = "RIG_AGENT_WITSML_XSD_DIR"
"""Environment variable naming the folder of the WITSML 1.4.1.1 schemas."""

_SCHEMA_PREFIX = "schema: "


def add_witsml_arguments(actions: argparse._SubParsersAction[Any]) -> None:
    """Add the actions of `rig-agent witsml` (validate) to its subparsers."""
    validate = actions.add_parser(
        "validate",
        help="check a WITSML 1.4.1.1 log file against the schema and the rules servers enforce",
        description="Check a WITSML 1.4.1.1 <logs> document. The server rules (unique "
        "mnemonics, the index curve first, a unitList that matches the curves, rows as wide "
        "as mnemonicList, numbers with '.', index times with a zone, and more) are always "
        "checked. The XML schema is checked too when a schema folder is given. Prints one "
        "line per problem as FILE:LINE: message, then a summary. Exit 0 when there is no "
        "problem, 1 when there are problems or the arguments are invalid, 2 when the file or "
        "the schema folder cannot be read.",
        usage_exit_code=EXIT_PROBLEMS,
    )
    validate.add_argument("file", type=Path, metavar="FILE", help="the WITSML file to check")
    validate.add_argument(
        "--xsd-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder of the WITSML 1.4.1.1 data schemas, which contains obj_log.xsd "
        f"(default: ${XSD_DIR_VARIABLE}; without either the schema is not checked)",
    )


def run_witsml_command(args: argparse.Namespace) -> int:
    """Run the `rig-agent witsml` action named in `args` and return the exit code."""
    if args.witsml_command == "validate":
        return run_validate(args.file, xsd_dir=args.xsd_dir)
    print(
        "rig-agent witsml: error: missing ACTION: use `rig-agent witsml validate FILE`",
        file=sys.stderr,
    )
    return EXIT_PROBLEMS


def run_validate(
    path: Path,
    *,
    xsd_dir: Path | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Check one file, print its problems sorted by line and a summary, and return the exit code.

    Without `xsd_dir`, the folder comes from $RIG_AGENT_WITSML_XSD_DIR. When
    neither is set, only the server rules are checked and the summary states it.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    schema_dir, origin = _schema_folder(xsd_dir)
    try:
        data = path.read_bytes()
    except OSError as exc:
        print(f"rig-agent witsml validate: cannot read {path}: {exc.strerror or exc}", file=err)
        return EXIT_UNREADABLE

    problems = [(problem, False) for problem in check_log_document(data)]
    if schema_dir is not None:
        try:
            found = schema_problems(data, schema_dir)
        except FileNotFoundError:
            print(
                f"rig-agent witsml validate: the schema folder {schema_dir} ({origin}) has no "
                "obj_log.xsd: give the folder of the WITSML 1.4.1.1 data schemas",
                file=err,
            )
            return EXIT_UNREADABLE
        except (OSError, ValueError) as exc:
            print(f"rig-agent witsml validate: {exc}", file=err)
            return EXIT_UNREADABLE
        # A file that is not XML gives the same parse error from both checks; list it once.
        problems.extend((p, True) for p in found if (p, False) not in problems)

    problems.sort(key=lambda item: -1 if item[0].line is None else item[0].line)
    for problem, from_schema in problems:
        print(_format_problem(path, problem, from_schema=from_schema), file=out)
    print(_summary(path, problems, schema_checked=schema_dir is not None), file=out)
    return EXIT_PROBLEMS if problems else EXIT_OK


def _schema_folder(xsd_dir: Path | None) -> tuple[Path | None, str]:
    """Return the schema folder to use and where it was given, for messages."""
    if xsd_dir is not None:
        return xsd_dir, "--xsd-dir"
    value = os.environ.get(XSD_DIR_VARIABLE, "")
    if value:
        return Path(value), f"${XSD_DIR_VARIABLE}"
    return None, ""


_UNLISTED = re.compile(r": (\d+) more data row problems not listed$")


def _format_problem(path: Path, problem: Problem, *, from_schema: bool) -> str:
    where = f"{path}:{problem.line}" if problem.line is not None else str(path)
    prefix = _SCHEMA_PREFIX if from_schema else ""
    return f"{where}: {prefix}{problem.message}"


def _unlisted_count(problem: Problem) -> int:
    """Return the count in the line that stands for data row problems beyond the listed ones."""
    match = _UNLISTED.search(problem.message)
    return int(match.group(1)) if match else 0


def _summary(path: Path, problems: list[tuple[Problem, bool]], *, schema_checked: bool) -> str:
    if not problems:
        checked = "the schema and the server rules" if schema_checked else "the server rules"
        lines = [f"{path}: no problems found against {checked}"]
    else:
        noun = "problem" if len(problems) == 1 else "problems"
        unlisted = sum(_unlisted_count(problem) for problem, _ in problems)
        summary = f"{path}: {len(problems) - (1 if unlisted else 0) + unlisted} {noun}"
        if unlisted:
            summary += f" ({unlisted} data row problems not listed)"
        if schema_checked:
            schema_count = sum(1 for _, from_schema in problems if from_schema)
            summary += f", {schema_count} of them found by the schema check"
        lines = [summary]
    if not schema_checked:
        lines.append(
            f"{path}: the XML schema was not checked; to check it, pass --xsd-dir DIR or set "
            f"${XSD_DIR_VARIABLE} to the folder that contains obj_log.xsd"
        )
    return "\n".join(lines)
