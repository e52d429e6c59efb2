"""Device token checks: registered public keys by `kid`, ES256 only, audience, expiry and replay."""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)
from jwt.algorithms import ECAlgorithm

from uplink.auth import jwk_thumbprint

__all__ = [
    "ALGORITHM",
    "AuthError",
    "DeviceClaims",
    "JtiCache",
    "KeyRegistry",
    "TokenVerifier",
    "load_public_key",
    "register_key",
    "unregister_key",
]

log = structlog.get_logger(__name__)

ALGORITHM = "ES256"
REQUIRED_CLAIMS = ["exp", "iat", "iss", "sub", "aud", "jti"]
PEM_SUFFIX = ".pem"
JWK_SUFFIX = ".jwk.json"


class AuthError(Exception):
    """A request's bearer token is missing or fails a check, so the service responds with 401.

    `reason` is a short code for counting. The message names what failed and the fix.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class DeviceClaims:
    """The checked claims of an accepted token."""

    device_id: str
    """The `sub` claim, equal to `iss`."""
    kid: str
    jti: str
    exp: float


def load_public_key(path: Path) -> EllipticCurvePublicKey:
    """Load an EC P-256 public key from a PEM file or a `*.jwk.json` file.

    Raises ValueError naming the file when it contains anything else.
    """
    data = path.read_bytes()
    try:
        if path.name.endswith(JWK_SUFFIX):
            key: Any = ECAlgorithm.from_jwk(data.decode("utf-8"))
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnicodeDecodeError, jwt.InvalidKeyError) as exc:
        msg = (
            f"{path}: not a PEM or JWK public key ({exc}); give the public key "
            "that `rig-agent keygen` printed"
        )
        raise ValueError(msg) from exc
    if isinstance(key, EllipticCurvePrivateKey):
        msg = f"{path}: contains a private key; register only the public key"
        raise ValueError(msg)  # noqa: TRY004 - a bad file's content, not a caller's type error
    if not isinstance(key, EllipticCurvePublicKey) or key.curve.name != SECP256R1.name:
        msg = f"{path}: expected an EC P-256 public key, got {type(key).__name__}"
        raise ValueError(msg)
    return key


def register_key(keys_dir: Path, public_key: bytes | str | Path) -> str:
    """Store a device public key in `keys_dir` as `{kid}.pem` and return its kid.

    `public_key` is PEM text or the path of a PEM or `*.jwk.json` file.
    Registering the same key again is harmless.
    """
    if isinstance(public_key, Path):
        key = load_public_key(public_key)
    else:
        pem = public_key.encode("ascii") if isinstance(public_key, str) else public_key
        loaded = serialization.load_pem_public_key(pem)
        if not isinstance(loaded, EllipticCurvePublicKey) or loaded.curve.name != SECP256R1.name:
            msg = f"expected an EC P-256 public key, got {type(loaded).__name__}"
            raise ValueError(msg)
        key = loaded
    kid = jwk_thumbprint(key)
    keys_dir.mkdir(parents=True, exist_ok=True)
    pem_out = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Write under a temporary name and rename, so the service never reads half a file.
    partial = keys_dir / f".{kid}.partial"
    partial.write_bytes(pem_out)
    partial.replace(keys_dir / f"{kid}{PEM_SUFFIX}")
    return kid


def unregister_key(keys_dir: Path, kid: str) -> list[Path]:
    """Remove every key file in `keys_dir` whose key has this kid; return the removed paths."""
    removed: list[Path] = []
    for path, key in _key_files(keys_dir):
        if jwk_thumbprint(key) == kid:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _key_files(keys_dir: Path) -> list[tuple[Path, EllipticCurvePublicKey]]:
    """Load every key file in the folder, skipping (and logging) the ones that fail."""
    if not keys_dir.is_dir():
        return []
    loaded: list[tuple[Path, EllipticCurvePublicKey]] = []
    for path in sorted(keys_dir.iterdir()):
        if not path.name.endswith((PEM_SUFFIX, JWK_SUFFIX)) or path.name.startswith("."):
            continue
        try:
            loaded.append((path, load_public_key(path)))
        except (OSError, ValueError) as exc:
            log.warning("key_file_skipped", path=str(path), error=str(exc))
    return loaded


class KeyRegistry:
    """Registered device public keys by kid (RFC 7638 thumbprint), read from a folder.

    The folder is read again whenever its modification time changes (a key
    file was added, removed or renamed) and whenever a token names an
    unknown kid, so keys can be registered and revoked while the service runs.
    """

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._keys: dict[str, EllipticCurvePublicKey] = {}
        self._stamp: int | None = None
        self.reload()

    def reload(self) -> None:
        """Read every key file of the folder and replace the registered set."""
        self._stamp = self._folder_stamp()
        keys = {jwk_thumbprint(key): key for _, key in _key_files(self.keys_dir)}
        if keys.keys() != self._keys.keys():
            log.info("device_keys_loaded", keys_dir=str(self.keys_dir), kids=sorted(keys))
        self._keys = keys

    def lookup(self, kid: str) -> EllipticCurvePublicKey | None:
        """Return the registered key with this kid, or None."""
        if kid not in self._keys or self._folder_stamp() != self._stamp:
            self.reload()
        return self._keys.get(kid)

    def kids(self) -> list[str]:
        return sorted(self._keys)

    def _folder_stamp(self) -> int | None:
        try:
            return self.keys_dir.stat().st_mtime_ns
        except OSError:
            return None


class JtiCache:
    """Token ids already used, each remembered until its token can no longer be accepted.

    NOTE: the set lives in memory, so a restart clears it and a token used
    just before the restart could be replayed until its `exp` plus leeway.
    A production backend keeps it in shared storage.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._expiry_heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def use(self, jti: str, until: float) -> bool:
        """Record `jti` as used until `until`; return False when it was used already."""
        self._forget_expired()
        if jti in self._until:
            return False
        self._until[jti] = until
        heapq.heappush(self._expiry_heap, (until, jti))
        return True

    def _forget_expired(self) -> None:
        now = self._clock()
        while self._expiry_heap and self._expiry_heap[0][0] < now:
            _, jti = heapq.heappop(self._expiry_heap)
            self._until.pop(jti, None)


class TokenVerifier:
    """Checks `Authorization: Bearer` device tokens against the registered keys."""

    def __init__(
        self,
        registry: KeyRegistry,
        *,
        audience: str,
        leeway_s: float,
        max_lifetime_s: float,
        jtis: JtiCache | None = None,
    ) -> None:
        self.registry = registry
        self.audience = audience
        self.leeway_s = leeway_s
        self.max_lifetime_s = max_lifetime_s
        self.jtis = jtis if jtis is not None else JtiCache()

    def verify(self, authorization: str | None) -> DeviceClaims:
        """Check the header's token and mark its jti used; raise AuthError on any failure."""
        token = _bearer_token(authorization)
        header = _unverified_header(token)
        # Checked before any key is touched, so no other algorithm (none, HS256 keyed
        # with the public key) can reach signature verification.
        alg = header.get("alg")
        if alg != ALGORITHM:
            msg = f"token algorithm {alg!r} is not accepted: sign device tokens with ES256"
            raise AuthError(msg, reason="algorithm_not_allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            msg = "token header has no kid: set kid to the thumbprint of the device key"
            raise AuthError(msg, reason="missing_kid")
        key = self.registry.lookup(kid)
        if key is None:
            msg = (
                f"unknown kid {kid!r}: no registered public key has this thumbprint; "
                "register the device key with `rig-agent-cloud register-key`"
            )
            raise AuthError(msg, reason="unknown_kid")

        claims = self._decode(token, key)
        device_id = claims["sub"]
        if claims["iss"] != device_id:
            msg = "token iss must equal sub (both are the device id)"
            raise AuthError(msg, reason="invalid_claim")
        lifetime = float(claims["exp"]) - float(claims["iat"])
        if lifetime > self.max_lifetime_s:
            msg = (
                f"token lifetime {lifetime:.0f} s is longer than the allowed "
                f"{self.max_lifetime_s:.0f} s: mint shorter-lived tokens"
            )
            raise AuthError(msg, reason="invalid_claim")
        if not self.jtis.use(claims["jti"], float(claims["exp"]) + self.leeway_s):
            msg = "token jti was already used: mint a new token for each request"
            raise AuthError(msg, reason="replayed_jti")
        return DeviceClaims(device_id, kid, claims["jti"], float(claims["exp"]))

    def _decode(self, token: str, key: EllipticCurvePublicKey) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                leeway=self.leeway_s,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError as exc:
            msg = f"token expired (more than {self.leeway_s:.0f} s past exp): mint a new token"
            raise AuthError(msg, reason="expired") from exc
        except jwt.ImmatureSignatureError as exc:
            msg = "token iat or nbf is in the future: check the device clock"
            raise AuthError(msg, reason="not_yet_valid") from exc
        except jwt.InvalidAudienceError as exc:
            msg = f"token aud is not {self.audience!r}: set the agent's cloud.audience to it"
            raise AuthError(msg, reason="wrong_audience") from exc
        except jwt.MissingRequiredClaimError as exc:
            msg = f"token has no {exc.claim!r} claim; required: {', '.join(REQUIRED_CLAIMS)}"
            raise AuthError(msg, reason="missing_claim") from exc
        except jwt.InvalidSignatureError as exc:
            msg = "token signature does not match the registered key of its kid"
            raise AuthError(msg, reason="invalid_signature") from exc
        except jwt.InvalidTokenError as exc:
            msg = f"token is invalid: {exc}"
            raise AuthError(msg, reason="invalid_token") from exc
        for name in ("iss", "sub", "jti"):
            if not isinstance(claims[name], str) or not claims[name]:
                msg = f"token claim {name!r} must be a non-empty string"
                raise AuthError(msg, reason="invalid_claim")
        return claims


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        msg = "missing Authorization header: send Authorization: Bearer <device JWT>"
        raise AuthError(msg, reason="missing_token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        msg = "Authorization header is not a bearer token: send Bearer <device JWT>"
        raise AuthError(msg, reason="missing_token")
    return token.strip()


def _unverified_header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.DecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = "bearer token is not a JWT (expected header.payload.signature in base64url)"
        raise AuthError(msg, reason="malformed_token") from exc
    return header
