"""The `rig-agent` command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from config.model import Config

__all__ = ["main"]

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_RUNTIME = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rig-agent",
        description="Edge gateway for drilling rigs: Modbus in, SQLite buffer, MQTT out.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the agent in the foreground")
    run.add_argument("-c", "--config", type=Path, required=True, help="path of the TOML config")

    check = commands.add_parser("check-config", help="validate a config and print what would run")
    check.add_argument("file", type=Path, help="path of the TOML config")

    status = commands.add_parser(
        "status", help="show buffer depth per sink and the newest value per channel"
    )
    status.add_argument("-c", "--config", type=Path, required=True, help="path of the TOML config")
    status.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    status.add_argument("--json", action="store_true", help="print one JSON object instead")

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on this machine against built-in simulators"
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep the demo buffer and log here (default: a temporary directory)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `rig-agent` command and return its exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "run":
        return _run(args.config)
    if args.command == "status":
        from agent.status import run_status

        return run_status(args.config, watch=args.watch, as_json=args.json)
    if args.command == "demo":
        from agent.demo import run_demo

        return run_demo(duration=args.duration, data_dir=args.data_dir)
    return EXIT_CONFIG


def _check_config(path: Path) -> int:
    from config.loader import ConfigError, load_config, summarize

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        count = len(exc.issues)
        print(
            f"{count} error{'s' if count != 1 else ''} in {path}; the agent would not start.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    print(summarize(config))
    print(f"{path}: OK")
    return EXIT_OK


def _run(path: Path) -> int:
    from config.loader import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        print(
            f"rig-agent did not start: fix {path} and run `rig-agent check-config {path}`.",
            file=sys.stderr,
        )
        return EXIT_CONFIG

    from agent.logs import configure_logging

    configure_logging(config.agent.log_level, config.agent.log_format)
    return asyncio.run(_run_agent(config))


async def _run_agent(config: Config) -> int:
    import structlog

    from agent.runtime import Agent

    log = structlog.get_logger("agent.cli")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, stop, signum)

    try:
        await Agent(config).run(stop)
    except OSError as exc:
        # Opening the buffer failed (data_dir missing rights, disk error): nothing ran.
        log.error("agent_failed", error=str(exc))
        return EXIT_RUNTIME
    return EXIT_OK


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    import structlog

    structlog.get_logger("agent.cli").info("signal_received", signal=signal.Signals(signum).name)
    stop.set()


if __name__ == "__main__":
    sys.exit(main())
