"""The `rig-agent` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from agent.runtime import Agent
    from config.model import Config

__all__ = ["main"]

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_RUNTIME = 2

_MODBUS_URL_HELP = (
    'device URL: "tcp://HOST:502", "rtu+tcp://HOST:4001" (serial gateway) or '
    '"rtu:///dev/ttyUSB0?baudrate=19200&parity=E&stopbits=1&bytesize=8"'
)

_WITS0_URL_HELP = (
    'link URL: "tcp://HOST:PORT" (connect to the device), "tcp-listen://0.0.0.0:PORT" '
    '(wait for the device to connect) or "serial:///dev/ttyS0?baudrate=9600&parity=N"'
)


class _ArgumentParser(argparse.ArgumentParser):
    """Argument parser whose exit code on a usage error is chosen per command.

    argparse exits 2 on a usage error. The modbus tools use 2 for a device
    failure, so their parsers pass `usage_exit_code=1`.
    """

    def __init__(self, *args: Any, usage_exit_code: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_exit_code = usage_exit_code

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit_code, f"{self.prog}: error: {message}\n")


def _build_parser() -> _ArgumentParser:
    parser = _ArgumentParser(
        prog="rig-agent",
        description="Edge gateway for drilling rigs: Modbus and WITS0 in, SQLite buffer, MQTT out.",
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
    keygen = commands.add_parser(
        "keygen",
        help="create a device key for the cloud uplink and print its public key to register",
        description="Write a new EC P-256 private key as PEM with mode 0600, then print the "
        "public key as PEM and as JWK, and its kid (the RFC 7638 thumbprint) for registration "
        "with the cloud service. Exit 1 when the file cannot be written.",
    )
    keygen.add_argument(
        "--out", type=Path, required=True, help="path of the private key file to create"
    )
    keygen.add_argument(
        "--force",
        action="store_true",
        help="replace an existing file; the old key stops working once the service drops it",
    )
    _add_modbus_commands(commands)
    _add_wits0_commands(commands)
    _add_witsml_commands(commands)
    _add_export_command(commands)
    _add_config_commands(commands)
    return parser


def _add_config_commands(commands: argparse._SubParsersAction[_ArgumentParser]) -> None:
    config = commands.add_parser(
        "config", help="config tools: print the JSON Schema of the config file for editors"
    )
    actions = config.add_subparsers(dest="config_command", metavar="ACTION")
    actions.add_parser(
        "schema",
        help="print the JSON Schema of the config file",
        description="Print the JSON Schema (draft 2020-12) of the TOML config file. Editors "
        "with a TOML language server (Taplo, Even Better TOML) use it to check keys and "
        "values as you type; `rig-agent check-config FILE` remains the full check.",
    )


def _add_witsml_commands(commands: argparse._SubParsersAction[_ArgumentParser]) -> None:
    from agent.witsml_tools import add_witsml_arguments

    witsml = commands.add_parser(
        "witsml",
        help="WITSML 1.4.1.1 tools: check a log file against the schema and server rules",
        usage_exit_code=EXIT_CONFIG,
    )
    actions = witsml.add_subparsers(dest="witsml_command", metavar="ACTION")
    add_witsml_arguments(actions)


def _add_export_command(commands: argparse._SubParsersAction[_ArgumentParser]) -> None:
    from agent.export import add_export_arguments

    add_export_arguments(commands)


def _add_modbus_commands(commands: argparse._SubParsersAction[_ArgumentParser]) -> None:
    modbus = commands.add_parser(
        "modbus",
        help="commissioning tools: read registers in every layout, find unit ids",
        usage_exit_code=EXIT_CONFIG,
    )
    actions = modbus.add_subparsers(dest="modbus_command", metavar="ACTION")

    read = actions.add_parser(
        "read",
        help="read once; print the raw registers and every type in all four layouts",
        description="Read once and print the raw values, then every type decoded in the "
        "ABCD, CDAB, BADC and DCBA layouts side by side. Exit 1 on invalid arguments, "
        "2 when the device cannot be reached, does not respond or returns an exception.",
        usage_exit_code=EXIT_CONFIG,
    )
    read.add_argument("url", help=_MODBUS_URL_HELP)
    read.add_argument("--unit", type=int, required=True, help="unit id (slave id) of the device")
    read.add_argument(
        "--table",
        choices=("holding", "input", "coil", "discrete"),
        default=None,
        help="register table (default: holding, or the one a Modicon address names)",
    )
    read.add_argument(
        "--address",
        required=True,
        help="first address: 0-based as in the config, or Modicon notation such as "
        "4x0101, or 40101 when --table is not given",
    )
    read.add_argument(
        "--address-base",
        type=int,
        choices=(0, 1),
        default=None,
        help="count --address from 0 or from 1 as the device manual does; "
        "either value turns off Modicon notation",
    )
    read.add_argument(
        "--count",
        type=int,
        default=None,
        help="number of registers (1 to 125) or bits (1 to 2000); default 2 registers or 8 bits",
    )
    read.add_argument("--timeout", default="1s", help='response timeout (default: "1s")')
    read.add_argument(
        "--types",
        default=None,
        help="comma-separated types to decode, such as float32,int32 (default: all)",
    )

    scan = actions.add_parser(
        "scan",
        help="list the unit ids that respond",
        description="Probe each unit id with one small read and list those that respond, "
        "including those that respond with an exception.",
        usage_exit_code=EXIT_CONFIG,
    )
    scan.add_argument("url", help=_MODBUS_URL_HELP)
    scan.add_argument(
        "--units", default="1-247", help='unit ids to probe, such as "1-10,15" (default: 1-247)'
    )
    scan.add_argument(
        "--table",
        choices=("holding", "input", "coil", "discrete"),
        default=None,
        help="table of the probe read (default: holding, or the one a Modicon address names)",
    )
    scan.add_argument(
        "--address",
        default="0",
        help="0-based address of the probe read, or Modicon notation such as 4x0001 (default: 0)",
    )
    scan.add_argument(
        "--timeout", default="200ms", help='time to wait for each unit id (default: "200ms")'
    )


def _add_wits0_commands(commands: argparse._SubParsersAction[_ArgumentParser]) -> None:
    wits0 = commands.add_parser(
        "wits0",
        help="commissioning tools: print WITS level 0 packets live",
        usage_exit_code=EXIT_CONFIG,
    )
    actions = wits0.add_subparsers(dest="wits0_command", metavar="ACTION")

    listen = actions.add_parser(
        "listen",
        help="print each packet as it arrives: code, standard mnemonic and value",
        description="Open a WITS level 0 link and print each packet as it arrives, one line "
        "per item with the standard record 01 mnemonic, until Ctrl-C or --duration; then "
        "print the counters. Exit 1 on invalid arguments, 2 when the link cannot be opened.",
        usage_exit_code=EXIT_CONFIG,
    )
    listen.add_argument("url", help=_WITS0_URL_HELP)
    listen.add_argument(
        "--raw",
        action="store_true",
        help="print the bytes as they arrive instead of decoded packets "
        "(\\r \\n escaped, hex when most bytes are not text)",
    )
    listen.add_argument(
        "--timezone",
        default=None,
        help="IANA time zone of the device clock, such as America/Chicago: show the time "
        "of packets that carry date (xx05) and time (xx06) items, converted to UTC",
    )
    listen.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    listen.add_argument(
        "--transmit",
        nargs="?",
        const="",
        default=None,
        metavar="PACKET",
        help="send a packet periodically on the same link, for an EDR that sends only after "
        "it receives one; PACKET is its data lines separated by ';' "
        '(default: the keep-alive "0111-9999")',
    )
    listen.add_argument(
        "--transmit-interval",
        default="30s",
        help='time between transmitted packets (default: "30s")',
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `rig-agent` command and return its exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader of a pipe (head, less) went away: stop quietly, and keep the
        # interpreter from failing again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    args, unrecognized = parser.parse_known_args(argv)
    if unrecognized:
        # argparse reports unknown options from the top-level parser, so give it the
        # usage exit code of the command they were written after.
        if args.command in ("modbus", "wits0", "witsml", "export"):
            parser.usage_exit_code = EXIT_CONFIG
        parser.error(f"unrecognized arguments: {' '.join(unrecognized)}")
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
    if args.command == "keygen":
        return _keygen(args.out, force=args.force)
    if args.command == "modbus":
        return _modbus(args)
    if args.command == "wits0":
        return _wits0(args)
    if args.command == "witsml":
        from agent.witsml_tools import run_witsml_command

        return run_witsml_command(args)
    if args.command == "config":
        return _config(args)
    if args.command == "export":
        from agent.export import run_export_command

        return run_export_command(args)
    return EXIT_CONFIG


def _modbus(args: argparse.Namespace) -> int:
    from agent.modbus_tools import run_read, run_scan

    if args.modbus_command == "read":
        return run_read(
            args.url,
            unit=args.unit,
            table=args.table,
            address=args.address,
            address_base=args.address_base,
            count=args.count,
            timeout=args.timeout,
            types=args.types,
        )
    if args.modbus_command == "scan":
        return run_scan(
            args.url,
            units=args.units,
            table=args.table,
            address=args.address,
            timeout=args.timeout,
        )
    print(
        "rig-agent modbus: name an action: read or scan (see rig-agent modbus --help)",
        file=sys.stderr,
    )
    return EXIT_CONFIG


def _wits0(args: argparse.Namespace) -> int:
    if args.wits0_command == "listen":
        from agent.wits0_tools import run_listen

        return run_listen(
            args.url,
            raw=args.raw,
            timezone=args.timezone,
            duration=args.duration,
            transmit=args.transmit,
            transmit_interval=args.transmit_interval,
        )
    print("rig-agent wits0: name an action: listen (see rig-agent wits0 --help)", file=sys.stderr)
    return EXIT_CONFIG


def _config(args: argparse.Namespace) -> int:
    if args.config_command == "schema":
        from config.schema import config_json_schema_text

        sys.stdout.write(config_json_schema_text())
        return EXIT_OK
    print("rig-agent config: name an action: schema (see rig-agent config --help)", file=sys.stderr)
    return EXIT_CONFIG


def _keygen(path: Path, *, force: bool) -> int:
    import json

    from cryptography.hazmat.primitives import serialization

    from uplink.auth import generate_key_file, public_jwk

    try:
        key = generate_key_file(path, overwrite=force)
    except FileExistsError:
        print(
            f"rig-agent keygen: {path} already exists and was left unchanged: choose another "
            "path, or add --force to replace it. A replaced key must be registered again "
            "before the service accepts the device.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"rig-agent keygen: failed to write {path}: {reason}", file=sys.stderr)
        return EXIT_CONFIG

    public_key = key.public_key()
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    jwk = public_jwk(public_key)
    print(f"Wrote the private key to {path} (mode 0600). Keep it on this device only.\n")
    print(f"Public key (PEM):\n{pem}")
    print(f"Public key (JWK):\n{json.dumps(jwk, indent=2)}\n")
    print(f"kid: {jwk['kid']}\n")
    print(
        "Register the public key with the cloud service: save the PEM above as a file and run "
        "`rig-agent-cloud register-key --keys-dir DIR FILE` on the reference service."
    )
    return EXIT_OK


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
    from uplink.auth import KeyFileError

    configure_logging(config.agent.log_level, config.agent.log_format)
    if config.mqtt is not None and config.mqtt.password_file:
        from uplink.mqtt import PasswordFileError, read_password_file

        # Read once now, so that a missing file stops the agent with one message
        # instead of failing the MQTT sink at every reconnect.
        try:
            read_password_file(config.mqtt.password_file)
        except PasswordFileError as exc:
            print(str(exc), file=sys.stderr)
            print(
                "rig-agent did not start: fix the password file and start it again.",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    try:
        return asyncio.run(_run_agent(config, path))
    except KeyFileError as exc:
        print(str(exc), file=sys.stderr)
        print(
            "rig-agent did not start: fix the device key file and start it again.", file=sys.stderr
        )
        return EXIT_CONFIG


async def _run_agent(config: Config, path: Path) -> int:
    import structlog

    from agent.health import MetricsListenError
    from agent.runtime import Agent
    from agent.sdnotify import Notifier
    from buffer.store import BufferDatabaseError

    log = structlog.get_logger("agent.cli")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, stop, signum)
    # Without a handler, SIGHUP would end the process before the agent runs.
    reload_requests: list[Agent] = []
    loop.add_signal_handler(signal.SIGHUP, _request_reload, reload_requests)

    notifier = Notifier.from_environment()
    try:
        agent = Agent(config, config_path=path, notifier=notifier)
        reload_requests.append(agent)
        await agent.run(stop)
    except MetricsListenError as exc:
        log.error("agent_failed", error=str(exc))
        print(f"rig-agent did not start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except (OSError, BufferDatabaseError) as exc:
        # Opening the buffer failed (no rights on data_dir, a corrupt file, another
        # agent on the same data_dir, a disk error): nothing ran.
        log.error("agent_failed", error=str(exc))
        print(f"rig-agent did not start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        if notifier is not None:
            notifier.close()
    return EXIT_OK


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    import structlog

    structlog.get_logger("agent.cli").info("signal_received", signal=signal.Signals(signum).name)
    stop.set()


def _request_reload(agents: list[Agent]) -> None:
    """Ask the agent to reload its config; a SIGHUP before the agent exists is ignored."""
    import structlog

    log = structlog.get_logger("agent.cli")
    log.info("signal_received", signal="SIGHUP")
    for agent in agents:
        agent.request_reload()


if __name__ == "__main__":
    sys.exit(main())
