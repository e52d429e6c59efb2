"""The `rig-agent-cloud` command line: run the reference ingest service, manage device keys."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rig-agent-cloud",
        description="Reference ingest service for rig-agent's HTTPS uplink.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the service under uvicorn",
        description="Options left out fall back to the RIG_CLOUD_* environment variables.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="TCP port to listen on")
    serve.add_argument("--db", help="SQLite file or sqlite:///PATH URL (RIG_CLOUD_DB)")
    serve.add_argument(
        "--keys-dir", type=Path, help="folder of registered public keys (RIG_CLOUD_KEYS_DIR)"
    )
    serve.add_argument("--audience", help="required token aud (RIG_CLOUD_AUDIENCE)")
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest request body in bytes after decompression (RIG_CLOUD_MAX_BODY_BYTES)",
    )
    serve.add_argument(
        "--test-faults",
        action="store_true",
        default=None,
        help="open POST /_test/faults for fault injection (RIG_CLOUD_TEST_FAULTS=1)",
    )
    serve.add_argument("--log-level", default="info", help="debug, info, warning or error")

    register = commands.add_parser(
        "register-key", help="register a device public key and print its kid"
    )
    register.add_argument("--keys-dir", type=Path, required=True, help="the service's key folder")
    register.add_argument("public_key", type=Path, help="PEM or *.jwk.json public key file")

    unregister = commands.add_parser(
        "unregister-key", help="remove a device key from the folder, by kid"
    )
    unregister.add_argument("--keys-dir", type=Path, required=True, help="the service's key folder")
    unregister.add_argument("kid", help="thumbprint printed at registration")
    return parser


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from agent.logs import configure_logging
    from cloud.app import create_app
    from cloud.settings import CloudSettings

    try:
        settings = CloudSettings.from_env()
    except ValueError as exc:
        print(f"rig-agent-cloud: {exc}", file=sys.stderr)
        return EXIT_ERROR
    overrides = {
        "db": args.db,
        "keys_dir": args.keys_dir,
        "audience": args.audience,
        "max_body_bytes": args.max_body_bytes,
        "test_faults": args.test_faults,
    }
    settings = dataclasses.replace(
        settings, **{name: value for name, value in overrides.items() if value is not None}
    )
    configure_logging(args.log_level)
    # log_config=None keeps uvicorn's loggers on the handler configure_logging installed.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None)
    return EXIT_OK


def _register(args: argparse.Namespace) -> int:
    from cloud.auth import register_key

    try:
        kid = register_key(args.keys_dir, args.public_key)
    except (OSError, ValueError) as exc:
        print(f"rig-agent-cloud: cannot register {args.public_key}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"registered kid {kid} in {args.keys_dir}")
    return EXIT_OK


def _unregister(args: argparse.Namespace) -> int:
    from cloud.auth import unregister_key

    removed = unregister_key(args.keys_dir, args.kid)
    if not removed:
        print(f"rig-agent-cloud: no key with kid {args.kid} in {args.keys_dir}", file=sys.stderr)
        return EXIT_ERROR
    for path in removed:
        print(f"removed {path}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `rig-agent-cloud` command and return its exit code."""
    args = _build_parser().parse_args(argv)
    handlers = {"serve": _serve, "register-key": _register, "unregister-key": _unregister}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
