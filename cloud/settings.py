"""Settings of the reference ingest service, from arguments or `RIG_CLOUD_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_MAX_BODY_BYTES",
    "CloudSettings",
    "sqlite_path",
]

DEFAULT_AUDIENCE = "rig-cloud"
DEFAULT_DB = "rig-cloud.db"
DEFAULT_KEYS_DIR = "cloud-keys"
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
"""Largest accepted request body, after gzip decompression."""
EXP_LEEWAY_S = 30.0
"""Seconds a token is still accepted after its `exp`, for devices whose clock runs late."""
MAX_TOKEN_LIFETIME_S = 600.0
"""Longest accepted `exp - iat` of a device token."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class CloudSettings:
    """Storage, trusted keys, token rules and test hooks of the ingest service."""

    db: str = DEFAULT_DB
    """SQLite file path, or a `sqlite:///PATH` URL."""
    keys_dir: Path = Path(DEFAULT_KEYS_DIR)
    """Folder of registered device public keys (`*.pem` or `*.jwk.json`)."""
    audience: str = DEFAULT_AUDIENCE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    test_faults: bool = False
    """Open `POST /_test/faults`, which makes the service fail on purpose."""
    leeway_s: float = EXP_LEEWAY_S
    max_token_lifetime_s: float = MAX_TOKEN_LIFETIME_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CloudSettings:
        """Build settings from `RIG_CLOUD_*` variables; unset ones keep their defaults.

        The variables are RIG_CLOUD_DB, RIG_CLOUD_KEYS_DIR, RIG_CLOUD_AUDIENCE,
        RIG_CLOUD_MAX_BODY_BYTES and RIG_CLOUD_TEST_FAULTS.
        """
        env = os.environ if environ is None else environ
        max_body = env.get("RIG_CLOUD_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES))
        if not max_body.isdigit() or int(max_body) < 1:
            msg = f"RIG_CLOUD_MAX_BODY_BYTES={max_body!r} is invalid: expected a positive integer"
            raise ValueError(msg)
        return cls(
            db=env.get("RIG_CLOUD_DB", DEFAULT_DB),
            keys_dir=Path(env.get("RIG_CLOUD_KEYS_DIR", DEFAULT_KEYS_DIR)),
            audience=env.get("RIG_CLOUD_AUDIENCE", DEFAULT_AUDIENCE),
            max_body_bytes=int(max_body),
            test_faults=_flag("RIG_CLOUD_TEST_FAULTS", env.get("RIG_CLOUD_TEST_FAULTS", "")),
        )


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    msg = f"{name}={value!r} is invalid: expected 1 or 0"
    raise ValueError(msg)


def sqlite_path(db: str) -> str:
    """Turn the `db` setting into a path for `sqlite3.connect`.

    Accepts a plain path, `sqlite:///relative.db`, `sqlite:////absolute.db`
    and `sqlite://` or `sqlite:///:memory:` for an in-memory database.
    """
    if "://" not in db:
        return db
    scheme, _, rest = db.partition("://")
    if scheme.lower() != "sqlite":
        # Only the scheme goes in the message: the rest of a URL may hold a password.
        msg = (
            f"database URL scheme {scheme!r} is not supported: the reference service "
            "stores readings in SQLite; give a file path or sqlite:///PATH"
        )
        raise ValueError(msg)
    path = rest.removeprefix("/")
    return path or ":memory:"
