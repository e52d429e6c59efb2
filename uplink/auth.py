"""Device keys and the ES256 JSON Web Tokens that authenticate the agent to the cloud."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import stat
import time
import uuid
from collections.abc import Callable, Generator
from pathlib import Path

import httpx
import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
    generate_private_key,
)
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = [
    "CREDENTIALS_VARIABLE",
    "MAX_TOKEN_LIFETIME",
    "DeviceAuth",
    "KeyFileError",
    "TokenMinter",
    "generate_key_file",
    "jwk_thumbprint",
    "load_private_key",
    "public_jwk",
    "resolve_secret_path",
]

log = structlog.get_logger(__name__)

CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"
"""Environment variable that systemd sets to the folder of a unit's `LoadCredential=` files."""

MAX_TOKEN_LIFETIME = 600.0
"""Maximum token lifetime in seconds (exp - iat) that the cloud service accepts."""

_COORDINATE_BYTES = 32
"""Length of a P-256 coordinate, which JWK encodes at full width (RFC 7518, section 6.2.1.2)."""

_RENEW_MARGIN = 60.0
"""Seconds before expiry at which a cached token is replaced (less for short lifetimes)."""

_MAX_REASON_CHARS = 200


class KeyFileError(Exception):
    """A device key file that is missing, unreadable, too widely readable or not a P-256 key.

    The message names the file and the fix, and never contains key material.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(message)


# --- Key files ------------------------------------------------------------------


def resolve_secret_path(value: str) -> Path:
    """Return the file that a secret setting names: a path as written, or a credential name.

    A bare file name with no directory part, such as "device-key.pem", is looked
    up in $CREDENTIALS_DIRECTORY, where systemd places the files of
    `LoadCredential=`. Raises KeyFileError for a bare name while that variable
    is not set. Any other value is a path, so "./device-key.pem" is a file in
    the working directory, which is / for a systemd service unless the unit
    sets WorkingDirectory=.
    """
    if not value:
        msg = "no key file given: expected a path, or a credential name under systemd"
        raise KeyFileError(value, msg)
    if os.sep in value or (os.altsep is not None and os.altsep in value) or value.startswith("~"):
        return Path(value).expanduser()
    if value in (".", ".."):
        msg = f"invalid key file name {value!r}: expected a file name or a path"
        raise KeyFileError(value, msg)
    directory = os.environ.get(CREDENTIALS_VARIABLE)
    if not directory:
        msg = (
            f"key file {value!r} is a bare name, which is looked up in "
            f"${CREDENTIALS_VARIABLE}, but that variable is not set: give a path such as "
            f'"/etc/rig-agent/{value}" or "./{value}", or run the agent under systemd with '
            f"LoadCredential={value}:/path/to/{value}"
        )
        raise KeyFileError(value, msg)
    return Path(directory) / value


def load_private_key(path: Path) -> EllipticCurvePrivateKey:
    """Read an unencrypted EC P-256 private key from a PEM file that only its owner can access.

    Raises KeyFileError naming the file and the fix when the file is missing,
    unreadable, readable or writable by group or others, or not a P-256 key.
    """
    pem = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        msg = (
            f"private key file {path} is encrypted with a passphrase, which the agent cannot "
            f"enter: create an unencrypted key with `rig-agent keygen --out {path}`"
        )
        raise KeyFileError(path, msg) from None
    except ValueError:
        # The library's message may quote parts of the file, so it is not passed on.
        raise KeyFileError(path, _not_private_key_message(path, pem)) from None
    return _require_p256(path, key)


def _not_private_key_message(path: Path, pem: bytes) -> str:
    if b"PUBLIC KEY-----" in pem:
        return (
            f"private key file {path} contains a public key: expected the private key file "
            "that `rig-agent keygen` wrote, while the public key is what the service registers"
        )
    return (
        f"private key file {path} is not a PEM private key: expected a file that begins with "
        "-----BEGIN PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----, such as "
        f"`rig-agent keygen --out {path}` writes"
    )


def _forbidden_mode_bits(path: Path) -> int:
    """Return the permission bits a key file must not have: any for group and others.

    Group read is allowed in $CREDENTIALS_DIRECTORY, because newer systemd
    releases grant the service user access to its credentials through an ACL,
    which shows as group read in the mode. That directory is private to the service.
    """
    directory = os.environ.get(CREDENTIALS_VARIABLE)
    if directory and path.parent == Path(directory):
        return 0o037
    return 0o077


def _read_key_file(path: Path) -> bytes:
    """Return the bytes of a key file after checking that group and others have no access."""
    try:
        with path.open("rb") as file:
            # Checking the open file, not the path, leaves no window to swap the file.
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                msg = f"private key file {path} is not a regular file: expected a PEM file"
                raise KeyFileError(path, msg)
            if mode & _forbidden_mode_bits(path):
                msg = (
                    f"private key file {path} has mode {stat.S_IMODE(mode):04o}, so group or "
                    f"others can access it: run `chmod 600 {path}`"
                )
                raise KeyFileError(path, msg)
            return file.read()
    except FileNotFoundError:
        msg = (
            f"private key file {path} not found: check private_key_file in [cloud], or "
            f"create a key with `rig-agent keygen --out {path}` and register it"
        )
        raise KeyFileError(path, msg) from None
    except IsADirectoryError:
        msg = f"private key file {path} is a directory: expected the path of a PEM file"
        raise KeyFileError(path, msg) from None
    except PermissionError:
        msg = (
            f"private key file {path} cannot be read: permission denied; make the user that "
            f"runs the agent its owner, such as `chown rig-agent {path}`, and keep mode 0600"
        )
        raise KeyFileError(path, msg) from None
    except OSError as exc:
        msg = f"private key file {path} cannot be read: {exc.strerror or exc}"
        raise KeyFileError(path, msg) from None


def _require_p256(path: Path, key: PrivateKeyTypes) -> EllipticCurvePrivateKey:
    if not isinstance(key, EllipticCurvePrivateKey):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        msg = (
            f"private key file {path} contains a {kind} key: expected an EC P-256 key, which "
            f"ES256 tokens need; create one with `rig-agent keygen --out FILE`"
        )
        raise KeyFileError(path, msg)
    if key.curve.name != SECP256R1.name:
        msg = (
            f"private key file {path} contains an EC key on curve {key.curve.name}: expected "
            f"P-256 (secp256r1), which ES256 tokens need; create one with "
            f"`rig-agent keygen --out FILE`"
        )
        raise KeyFileError(path, msg)
    return key


def generate_key_file(path: Path, *, overwrite: bool = False) -> EllipticCurvePrivateKey:
    """Create a P-256 private key and write it as unencrypted PKCS #8 PEM with mode 0600.

    Raises FileExistsError if the file exists and `overwrite` is false. With
    `overwrite`, the key goes to a new file in the same directory that then
    replaces the old one, so the old file's mode is not inherited.
    """
    key = generate_private_key(SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if not overwrite:
        _write_new_file(path, pem)
        return key
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    _write_new_file(temporary, pem)
    try:
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    return key


def _write_new_file(path: Path, data: bytes) -> None:
    """Write data to a file that must not exist yet, created with mode 0600 and synced to disk."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # The umask can only remove bits, but a umask such as 0277 would leave 0400.
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, data)
        os.fsync(descriptor)
    except OSError:
        os.close(descriptor)
        path.unlink(missing_ok=True)
        raise
    os.close(descriptor)


# --- Public keys as JWK -----------------------------------------------------------


def _b64url(data: bytes) -> str:
    """Encode bytes as base64url without padding, as JOSE requires."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _ec_members(public_key: EllipticCurvePublicKey) -> dict[str, str]:
    """Return the required JWK members of a P-256 public key: crv, kty, x and y."""
    if public_key.curve.name != SECP256R1.name:
        msg = f"expected an EC P-256 (secp256r1) public key, got curve {public_key.curve.name}"
        raise ValueError(msg)
    numbers = public_key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(_COORDINATE_BYTES, "big")),
        "y": _b64url(numbers.y.to_bytes(_COORDINATE_BYTES, "big")),
    }


def jwk_thumbprint(public_key: EllipticCurvePublicKey) -> str:
    """Compute the RFC 7638 JWK thumbprint of a P-256 public key, used as the token `kid`.

    The digest is SHA-256 over the JSON of the required members only, keys
    sorted and no whitespace, and the result is base64url without padding.
    """
    canonical = json.dumps(_ec_members(public_key), sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def public_jwk(public_key: EllipticCurvePublicKey) -> dict[str, str]:
    """Return the public JWK of a P-256 key: kty, crv, x, y and its thumbprint as kid."""
    members = _ec_members(public_key)
    return {
        "kty": members["kty"],
        "crv": members["crv"],
        "x": members["x"],
        "y": members["y"],
        "kid": jwk_thumbprint(public_key),
    }


# --- Tokens -----------------------------------------------------------------------


class TokenMinter:
    """Signs short-lived ES256 tokens for one device and caches the current one.

    Claims: iss = sub = device_id, aud, iat, exp = iat + lifetime and a random
    jti. The header carries the key's RFC 7638 thumbprint as kid.
    """

    def __init__(
        self,
        key: EllipticCurvePrivateKey,
        *,
        device_id: str,
        audience: str,
        lifetime: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1.0 <= lifetime <= MAX_TOKEN_LIFETIME:
            msg = (
                f"token lifetime {lifetime:g}s is out of range: expected 1s to "
                f"{MAX_TOKEN_LIFETIME:g}s, the maximum the cloud service accepts"
            )
            raise ValueError(msg)
        self._key = key
        self._device_id = device_id
        self._audience = audience
        self._lifetime = math.floor(lifetime)
        self._clock = clock
        self.kid = jwk_thumbprint(key.public_key())
        # A short token is renewed after 80 % of its life rather than 60 s before it ends.
        self._margin = min(_RENEW_MARGIN, 0.2 * self._lifetime)
        self._token = ""
        self._expires = 0

    @property
    def device_id(self) -> str:
        """The device id that the tokens carry as iss and sub."""
        return self._device_id

    def token(self) -> str:
        """Return the cached token, or a new one when the cached one is close to expiry."""
        if not self._token or self._clock() >= self._expires - self._margin:
            return self.fresh_token()
        return self._token

    def fresh_token(self) -> str:
        """Sign a new token with a new jti, cache it and return it."""
        issued = int(self._clock())
        expires = issued + self._lifetime
        claims = {
            "iss": self._device_id,
            "sub": self._device_id,
            "aud": self._audience,
            "iat": issued,
            "exp": expires,
            "jti": uuid.uuid4().hex,
        }
        headers = {"kid": self.kid, "typ": "JWT"}
        self._token = jwt.encode(claims, self._key, algorithm="ES256", headers=headers)
        self._expires = expires
        log.debug("device_token_minted", device_id=self._device_id, kid=self.kid)
        return self._token


class DeviceAuth(httpx.Auth):
    """httpx authentication that sends the device token and retries once after a 401.

    The retry carries a freshly minted token. A second 401 is returned to the
    caller. The request body is sent twice then, so it must be bytes, not a
    stream. Every response body is read before the caller sees it, so that the
    reason of a 401 can be logged.
    """

    requires_response_body = True

    def __init__(self, minter: TokenMinter) -> None:
        self._minter = minter
        self._failures = 0
        self._failing_since = 0.0

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send the request with a fresh token, and once more with another after a 401.

        Every request gets its own token because the service rejects a reused
        `jti` as a replay. Signing took about 0.03 ms per token on a 2-vCPU x86 VM.
        """
        token = self._minter.fresh_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != httpx.codes.UNAUTHORIZED:
            self._note_accepted()
            return

        # While the service keeps rejecting fresh tokens, _note_rejected reports the outage.
        log_retry = log.debug if self._failures else log.info
        log_retry(
            "cloud_token_rejected_retrying",
            device_id=self._minter.device_id,
            kid=self._minter.kid,
            reason=_reason(response, token),
        )
        token = self._minter.fresh_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == httpx.codes.UNAUTHORIZED:
            self._note_rejected(_reason(response, token))
        else:
            self._note_accepted()

    def _note_rejected(self, reason: str) -> None:
        """Log a rejected fresh token: WARNING the first time, DEBUG with a count after that."""
        self._failures += 1
        fields = {"device_id": self._minter.device_id, "kid": self._minter.kid, "reason": reason}
        if self._failures == 1:
            self._failing_since = time.monotonic()
            log.warning("cloud_auth_failed", **fields)
        else:
            log.debug("cloud_auth_failed", failures=self._failures, **fields)

    def _note_accepted(self) -> None:
        if self._failures:
            log.info(
                "cloud_auth_recovered",
                device_id=self._minter.device_id,
                kid=self._minter.kid,
                failures=self._failures,
                outage_seconds=round(time.monotonic() - self._failing_since, 1),
            )
        self._failures = 0


def _reason(response: httpx.Response, token: str) -> str:
    """Return the reason a 401 response gives, shortened, with the token blanked out if echoed."""
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        detail = response.text
    text = str(detail).replace(token, "<token>")
    return text[:_MAX_REASON_CHARS] or response.reason_phrase
