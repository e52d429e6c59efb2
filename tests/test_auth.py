"""Device keys, key files, token minting and the httpx authentication of the cloud uplink."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from structlog.testing import capture_logs
from structlog.typing import EventDict

from agent.cli import main
from uplink.auth import (
    DeviceAuth,
    KeyFileError,
    TokenMinter,
    generate_key_file,
    jwk_thumbprint,
    load_private_key,
    public_jwk,
    resolve_secret_path,
)

DEVICE = "rig-07-edge"
AUDIENCE = "rig-cloud"
URL = "https://ingest.test/v1/readings"


class Clock:
    """A settable clock in seconds since the epoch, for the minter's `clock` argument."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def debug_logs() -> Iterator[list[EventDict]]:
    """Capture structlog events at every level, whatever level an earlier test configured."""
    old_wrapper = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=old_wrapper)


def write_pem(path: Path, key: object, mode: int = 0o600) -> Path:
    pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def decode(token: str, key: ec.EllipticCurvePrivateKey) -> dict[str, object]:
    claims: dict[str, object] = jwt.decode(
        token, key.public_key(), algorithms=["ES256"], audience=AUDIENCE, leeway=10**10
    )
    return claims


# --- Thumbprint and JWK -----------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def test_thumbprint_matches_rfc7638_by_hand() -> None:
    """The kid equals SHA-256 over the hand-written canonical JWK of a fixed key, in base64url."""
    key = ec.derive_private_key(0x1F2E3D4C5B6A79881726354453627180, ec.SECP256R1())
    # PyJWT encodes the coordinates independently of the code under test.
    members = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    canonical = f'{{"crv":"P-256","kty":"EC","x":"{members["x"]}","y":"{members["y"]}"}}'
    expected = b64url(hashlib.sha256(canonical.encode()).digest())
    assert jwk_thumbprint(key.public_key()) == expected


def test_thumbprint_pads_short_coordinate() -> None:
    """A coordinate below 2**248 is encoded at the full 32 bytes before hashing."""
    scalar = 1
    while ec.derive_private_key(scalar, ec.SECP256R1()).public_key().public_numbers().x >= 2**248:
        scalar += 1
    public_key = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    numbers = public_key.public_numbers()
    members = {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":"))
    expected = b64url(hashlib.sha256(canonical.encode()).digest())
    assert jwk_thumbprint(public_key) == expected


def test_public_jwk_members(key: ec.EllipticCurvePrivateKey) -> None:
    """The public JWK has the coordinates PyJWT computes, and the thumbprint as kid."""
    jwk = public_jwk(key.public_key())
    reference = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    assert {name: jwk[name] for name in ("kty", "crv", "x", "y")} == reference
    assert jwk["kid"] == jwk_thumbprint(key.public_key())


def test_thumbprint_rejects_other_curve() -> None:
    """A P-384 public key has no ES256 thumbprint and raises ValueError."""
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ValueError, match="P-256"):
        jwk_thumbprint(other)


# --- Key files --------------------------------------------------------------------


def test_load_key_roundtrip(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A mode 0600 PEM file loads as the same P-256 key."""
    loaded = load_private_key(write_pem(tmp_path / "key.pem", key))
    assert jwk_thumbprint(loaded.public_key()) == jwk_thumbprint(key.public_key())


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_key_rejects_open_mode(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey, mode: int
) -> None:
    """A key file that group or others can access raises KeyFileError naming the chmod fix."""
    path = write_pem(tmp_path / "key.pem", key, mode)
    with pytest.raises(KeyFileError) as caught:
        load_private_key(path)
    assert caught.value.path == str(path)
    assert f"chmod 600 {path}" in str(caught.value)
    assert f"mode {mode:04o}" in str(caught.value)


def test_load_key_missing_file(tmp_path: Path) -> None:
    """A missing key file raises KeyFileError naming it and keygen."""
    path = tmp_path / "absent.pem"
    with pytest.raises(KeyFileError) as caught:
        load_private_key(path)
    assert f"{path} not found" in str(caught.value)
    assert "rig-agent keygen" in str(caught.value)


def test_load_key_directory(tmp_path: Path) -> None:
    """A directory given as the key file raises KeyFileError."""
    with pytest.raises(KeyFileError, match="is a directory"):
        load_private_key(tmp_path)


def test_load_key_rejects_rsa(tmp_path: Path) -> None:
    """An RSA key raises KeyFileError that names the expected EC P-256 key."""
    path = write_pem(tmp_path / "rsa.pem", rsa.generate_private_key(65537, 2048))
    with pytest.raises(KeyFileError, match="RSA key: expected an EC P-256 key"):
        load_private_key(path)


def test_load_key_rejects_p384(tmp_path: Path) -> None:
    """An EC key on another curve raises KeyFileError naming that curve."""
    path = write_pem(tmp_path / "p384.pem", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(KeyFileError, match="curve secp384r1"):
        load_private_key(path)


def test_load_key_rejects_garbage(tmp_path: Path) -> None:
    """A file that is not PEM raises KeyFileError without quoting the file's content."""
    path = tmp_path / "key.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        load_private_key(path)
    assert "not a PEM private key" in str(caught.value)
    assert "c2VjcmV0" not in str(caught.value)


def test_load_key_rejects_public_key(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A public key PEM given as the private key raises KeyFileError naming the mix-up."""
    path = tmp_path / "public.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="contains a public key"):
        load_private_key(path)


def test_load_key_rejects_encrypted(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A passphrase-protected key raises KeyFileError, since the agent has no passphrase."""
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="encrypted with a passphrase"):
        load_private_key(path)


def test_secret_path_from_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare name resolves inside $CREDENTIALS_DIRECTORY."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_secret_path("device-key.pem") == tmp_path / "device-key.pem"


def test_secret_path_keeps_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Absolute and relative paths are used as written, even with credentials available."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_secret_path("/etc/rig-agent/key.pem") == Path("/etc/rig-agent/key.pem")
    assert resolve_secret_path("./key.pem") == Path("key.pem")
    assert resolve_secret_path("keys/key.pem") == Path("keys/key.pem")


def test_secret_path_bare_name_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare name without $CREDENTIALS_DIRECTORY raises KeyFileError naming both fixes."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(KeyFileError) as caught:
        resolve_secret_path("device-key.pem")
    assert "give a path" in str(caught.value)
    assert "LoadCredential=device-key.pem" in str(caught.value)


def test_credential_key_loads(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key placed as a systemd credential loads by its bare name."""
    write_pem(tmp_path / "device-key.pem", key, 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    loaded = load_private_key(resolve_secret_path("device-key.pem"))
    assert jwk_thumbprint(loaded.public_key()) == jwk_thumbprint(key.public_key())


def test_generate_key_file_mode(tmp_path: Path) -> None:
    """A generated key file has mode 0600 even under a umask that would leave it 0400."""
    old_umask = os.umask(0o277)
    try:
        key = generate_key_file(tmp_path / "key.pem")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    loaded = load_private_key(tmp_path / "key.pem")
    assert jwk_thumbprint(loaded.public_key()) == jwk_thumbprint(key.public_key())


def test_generate_key_file_exclusive(tmp_path: Path) -> None:
    """Generating over an existing file raises FileExistsError and keeps the file."""
    path = tmp_path / "key.pem"
    path.write_text("old")
    with pytest.raises(FileExistsError):
        generate_key_file(path)
    assert path.read_text() == "old"


def test_generate_key_file_overwrite(tmp_path: Path) -> None:
    """With overwrite, a world-readable old file is replaced by a new one with mode 0600."""
    path = tmp_path / "key.pem"
    path.write_text("old")
    path.chmod(0o644)
    generate_key_file(path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() != "old"
    assert sorted(tmp_path.iterdir()) == [path]


# --- keygen command ---------------------------------------------------------------


def kid_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("kid: ")]
    assert len(lines) == 1
    return lines[0].removeprefix("kid: ")


def test_keygen_writes_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keygen` writes a 0600 key and prints its public PEM, its JWK and its thumbprint as kid."""
    path = tmp_path / "device-key.pem"
    assert main(["keygen", "--out", str(path)]) == 0
    output = capsys.readouterr().out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public_key = load_private_key(path).public_key()
    kid = jwk_thumbprint(public_key)
    assert kid_line(output) == kid
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert pem in output
    assert json.dumps(public_jwk(public_key), indent=2) in output
    assert "rig-agent-cloud register-key" in output
    assert "PRIVATE KEY" not in output


def test_keygen_refuses_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keygen` on an existing file exits 1 naming it and leaves the file unchanged."""
    path = tmp_path / "device-key.pem"
    path.write_text("old")
    assert main(["keygen", "--out", str(path)]) == 1
    assert f"{path} already exists" in capsys.readouterr().err
    assert path.read_text() == "old"


def test_keygen_force_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keygen --force` replaces an existing key with a new one."""
    path = tmp_path / "device-key.pem"
    assert main(["keygen", "--out", str(path)]) == 0
    first = kid_line(capsys.readouterr().out)
    assert main(["keygen", "--out", str(path), "--force"]) == 0
    second = kid_line(capsys.readouterr().out)
    assert first != second
    assert jwk_thumbprint(load_private_key(path).public_key()) == second


def test_keygen_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keygen` into a missing directory exits 1 naming the file."""
    path = tmp_path / "absent" / "device-key.pem"
    assert main(["keygen", "--out", str(path)]) == 1
    assert f"failed to write {path}" in capsys.readouterr().err


# --- Tokens -----------------------------------------------------------------------


def test_token_claims(key: ec.EllipticCurvePrivateKey) -> None:
    """A minted token verifies as ES256 and carries every claim of the cloud contract."""
    clock = Clock()
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE, lifetime=300, clock=clock)
    token = minter.token()
    claims = decode(token, key)
    assert claims["iss"] == DEVICE
    assert claims["sub"] == DEVICE
    assert claims["aud"] == AUDIENCE
    assert claims["iat"] == int(clock.now)
    assert claims["exp"] == int(clock.now) + 300
    assert uuid.UUID(hex=str(claims["jti"])).version == 4
    assert len(str(claims["jti"])) == 32


def test_token_header(key: ec.EllipticCurvePrivateKey) -> None:
    """The token header names ES256, type JWT and the key's thumbprint as kid."""
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE)
    header = jwt.get_unverified_header(minter.token())
    assert header == {"alg": "ES256", "typ": "JWT", "kid": jwk_thumbprint(key.public_key())}
    assert minter.kid == header["kid"]


def test_token_verifies_now(key: ec.EllipticCurvePrivateKey) -> None:
    """A token minted with the real clock passes PyJWT's time checks with no leeway."""
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE)
    claims = jwt.decode(minter.token(), key.public_key(), algorithms=["ES256"], audience=AUDIENCE)
    assert claims["sub"] == DEVICE


def test_token_rejected_by_other_key(key: ec.EllipticCurvePrivateKey) -> None:
    """A token does not verify with another device's public key."""
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(minter.token(), other, algorithms=["ES256"], audience=AUDIENCE)


def test_token_cached_then_renewed(key: ec.EllipticCurvePrivateKey) -> None:
    """The token is reused until 60 s before expiry, then replaced by one with a new jti."""
    clock = Clock()
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE, lifetime=300, clock=clock)
    first = minter.token()
    clock.now += 239
    assert minter.token() == first
    clock.now += 1
    second = minter.token()
    assert second != first
    assert decode(second, key)["jti"] != decode(first, key)["jti"]
    assert decode(second, key)["iat"] == int(clock.now)


def test_short_token_renewed_at_80_percent(key: ec.EllipticCurvePrivateKey) -> None:
    """A 30 s token is renewed once 24 s of it have passed, not 60 s before it ends."""
    clock = Clock()
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE, lifetime=30, clock=clock)
    first = minter.token()
    clock.now += 23
    assert minter.token() == first
    clock.now += 1
    assert minter.token() != first


def test_fresh_token_always_new(key: ec.EllipticCurvePrivateKey) -> None:
    """fresh_token mints a new jti at once, and token() then returns that new token."""
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE, clock=Clock())
    first = minter.token()
    fresh = minter.fresh_token()
    assert decode(fresh, key)["jti"] != decode(first, key)["jti"]
    assert minter.token() == fresh


def test_lifetime_600_allowed(key: ec.EllipticCurvePrivateKey) -> None:
    """A 600 s lifetime, the contract's maximum, gives exp = iat + 600."""
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE, lifetime=600, clock=Clock())
    claims = decode(minter.token(), key)
    assert int(str(claims["exp"])) - int(str(claims["iat"])) == 600


@pytest.mark.parametrize("lifetime", [600.5, 601, 3600, 0, -5])
def test_lifetime_out_of_range(key: ec.EllipticCurvePrivateKey, lifetime: float) -> None:
    """A lifetime over 600 s, or not positive, raises ValueError."""
    with pytest.raises(ValueError, match="token lifetime"):
        TokenMinter(key, device_id=DEVICE, audience=AUDIENCE, lifetime=lifetime)


# --- DeviceAuth -------------------------------------------------------------------


class Service:
    """A MockTransport handler that returns a scripted list of status codes."""

    def __init__(self, statuses: list[int], detail: str = "token rejected") -> None:
        self.statuses = statuses
        self.detail = detail
        self.tokens: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        authorization = request.headers["Authorization"]
        assert authorization.startswith("Bearer ")
        self.tokens.append(authorization.removeprefix("Bearer "))
        assert request.content == b'{"readings": []}'
        status = self.statuses[min(len(self.tokens), len(self.statuses)) - 1]
        detail = self.detail.replace("{token}", self.tokens[-1])
        body = {"detail": detail} if status == 401 else {"accepted": 0, "duplicates": 0}
        return httpx.Response(status, json=body)


async def post(service: Service, minter: TokenMinter, times: int = 1) -> httpx.Response:
    auth = DeviceAuth(minter)
    transport = httpx.MockTransport(service)
    async with httpx.AsyncClient(transport=transport, auth=auth) as client:
        for _ in range(times):
            response = await client.post(URL, content=b'{"readings": []}')
    return response


async def test_auth_sends_bearer(key: ec.EllipticCurvePrivateKey) -> None:
    """A request carries the minter's token and is sent once when the service accepts it."""
    service = Service([200])
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE)
    response = await post(service, minter)
    assert response.status_code == 200
    assert service.tokens == [minter.token()]


async def test_auth_retries_after_401(key: ec.EllipticCurvePrivateKey) -> None:
    """A 401 then a 200 makes two requests with distinct jti, and the caller sees the 200."""
    service = Service([401, 200])
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE)
    response = await post(service, minter)
    assert response.status_code == 200
    assert len(service.tokens) == 2
    first, second = (decode(token, key)["jti"] for token in service.tokens)
    assert first != second


async def test_auth_second_401_returned(key: ec.EllipticCurvePrivateKey) -> None:
    """Two 401s in a row return the second 401 after exactly two requests."""
    service = Service([401, 401])
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE)
    response = await post(service, minter)
    assert response.status_code == 401
    assert response.json() == {"detail": "token rejected"}
    assert len(service.tokens) == 2


def test_auth_sync_client(key: ec.EllipticCurvePrivateKey) -> None:
    """The same flow works with a synchronous httpx.Client."""
    service = Service([401, 200])
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE)
    transport = httpx.MockTransport(service)
    with httpx.Client(transport=transport, auth=DeviceAuth(minter)) as client:
        response = client.post(URL, content=b'{"readings": []}')
    assert response.status_code == 200
    assert len(service.tokens) == 2


async def test_auth_logs_rejection_once(
    key: ec.EllipticCurvePrivateKey, debug_logs: list[EventDict]
) -> None:
    """Repeated failed retries log one WARNING, then DEBUG with a count, then INFO on recovery."""
    service = Service([401, 401, 401, 401, 200])
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE)
    await post(service, minter, times=3)
    failed = [entry for entry in debug_logs if entry["event"] == "cloud_auth_failed"]
    assert [entry["log_level"] for entry in failed] == ["warning", "debug"]
    assert failed[1]["failures"] == 2
    assert failed[0]["reason"] == "token rejected"
    recovered = [entry for entry in debug_logs if entry["event"] == "cloud_auth_recovered"]
    assert len(recovered) == 1
    assert recovered[0]["failures"] == 2


async def test_tokens_never_logged(
    key: ec.EllipticCurvePrivateKey,
    debug_logs: list[EventDict],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No token, Authorization header or key appears in structlog or stdlib log output."""
    caplog.set_level(logging.DEBUG)
    # The service echoes the token in its reason, which must not reach the log either.
    service = Service([401, 401, 401, 200], detail="bad token {token}")
    minter = TokenMinter(key, device_id=DEVICE, audience=AUDIENCE)
    await post(service, minter, times=2)

    structlog_text = repr(debug_logs)
    assert any(entry.get("kid") == minter.kid for entry in debug_logs)
    assert "httpx" in caplog.text
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    private_line = pem.splitlines()[1]
    for text in (structlog_text, caplog.text):
        for token in service.tokens:
            assert token not in text
            assert token.split(".")[2] not in text
        assert "Bearer" not in text
        assert "eyJ" not in text
        assert private_line not in text


def test_credential_key_group_read_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key in $CREDENTIALS_DIRECTORY may be group-readable (systemd's ACL), elsewhere not."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    key_path = credentials / "device-key.pem"
    generate_key_file(key_path)
    key_path.chmod(0o640)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    assert load_private_key(resolve_secret_path("device-key.pem")) is not None

    key_path.chmod(0o660)
    with pytest.raises(KeyFileError, match="0660"):
        load_private_key(key_path)

    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    key_path.chmod(0o640)
    with pytest.raises(KeyFileError, match="0640"):
        load_private_key(key_path)
