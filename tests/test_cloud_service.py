"""Reference ingest service: token checks, batch storage, validation, limits, faults and queries."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloud.app import create_app
from cloud.auth import JtiCache, KeyRegistry, load_public_key
from cloud.cli import main as cloud_main
from cloud.ingest import IngestRejected, ReadingBatch, parse_batch
from cloud.settings import CloudSettings, sqlite_path
from cloud.store import ReadingStore
from tests.peers import CloudService, free_port, wait_for_port
from uplink.auth import jwk_thumbprint

AUDIENCE = "rig-cloud"
NETWORK_TIMEOUT = 10


# --- helpers ----------------------------------------------------------------------


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims_for(device_id: str, **overrides: Any) -> dict[str, Any]:
    """Valid claims for `device_id`; an override of None removes that claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": device_id,
        "sub": device_id,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def es256_token(key: ec.EllipticCurvePrivateKey, device_id: str, **overrides: Any) -> str:
    kid = jwk_thumbprint(key.public_key())
    return jwt.encode(
        claims_for(device_id, **overrides), key, algorithm="ES256", headers={"kid": kid}
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hand_made_token(
    header: dict[str, Any], claims: dict[str, Any], hmac_secret: bytes | None
) -> str:
    """Build a JWT without PyJWT: HMAC-SHA256 signed with `hmac_secret`, or unsigned."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if hmac_secret is None:
        return f"{signing_input}."
    signature = hmac.new(hmac_secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def reading(seq: int, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "seq": seq,
        "ts": "2024-05-01T12:00:00.000001Z",
        "channel": "standpipe_pressure",
        "value": 1000.0 + seq,
        "unit": "psi",
        "quality": "good",
    }
    return base | overrides


def batch(device_id: str, seqs: range | list[int]) -> dict[str, Any]:
    return {"device_id": device_id, "rig_id": "rig-07", "readings": [reading(s) for s in seqs]}


async def post_batch(
    client: httpx.AsyncClient,
    token: str | None,
    body: dict[str, Any] | bytes,
    *,
    compress: bool = True,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a body to /v1/readings, gzip-compressed unless `compress` is false."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent_headers = {"Content-Type": "application/json"}
    if compress:
        content = gzip.compress(content)
        sent_headers["Content-Encoding"] = "gzip"
    if token is not None:
        sent_headers["Authorization"] = f"Bearer {token}"
    if isinstance(body, dict) and body.get("readings"):
        seqs = [r["seq"] for r in body["readings"]]
        sent_headers["Idempotency-Key"] = f"{body['device_id']}:{seqs[0]}-{seqs[-1]}"
    sent_headers |= headers or {}
    async with asyncio.timeout(NETWORK_TIMEOUT):
        return await client.post("/v1/readings", content=content, headers=sent_headers)


async def get_json(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    async with asyncio.timeout(NETWORK_TIMEOUT):
        response = await client.get(path, params=params)
    response.raise_for_status()
    return response.json()


# --- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def service(device_key: ec.EllipticCurvePrivateKey) -> Iterator[CloudService]:
    """One uvicorn child process for the module, with `device_key` registered and faults on."""
    cloud = CloudService()
    cloud.register_key(public_pem(device_key))
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.close()


@pytest.fixture
async def client(service: CloudService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.base_url, timeout=NETWORK_TIMEOUT) as http:
        yield http


@pytest.fixture
async def faults(service: CloudService) -> AsyncIterator[CloudService]:
    """The module's service, with every pending fault cleared after the test."""
    try:
        yield service
    finally:
        await service.clear_faults()


@pytest.fixture
def device_id() -> str:
    """A device id no other test uses, so each test reads its own counters."""
    return f"edge-{uuid.uuid4().hex[:10]}"


AppFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def in_process(
    tmp_path: Path, device_key: ec.EllipticCurvePrivateKey
) -> AsyncIterator[AppFactory]:
    """Build the app in this process with given settings and return an httpx client for it."""
    stack = contextlib.AsyncExitStack()
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "device.pem").write_bytes(public_pem(device_key))

    async def make(**settings: Any) -> httpx.AsyncClient:
        app = create_app(
            CloudSettings(db=str(tmp_path / "cloud.db"), keys_dir=keys_dir, **settings)
        )
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        return await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://cloud.test")
        )

    async with stack:
        yield make


# --- authentication (service under uvicorn) ---------------------------------------


async def test_alg_none_rejected(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """An unsigned token (alg none) naming a registered kid gets 401 with a reason."""
    header = {"alg": "none", "typ": "JWT", "kid": jwk_thumbprint(device_key.public_key())}
    token = hand_made_token(header, claims_for(device_id), hmac_secret=None)
    response = await post_batch(client, token, batch(device_id, range(1, 3)))
    assert response.status_code == 401
    assert response.json()["reason"] == "algorithm_not_allowed"
    assert "ES256" in response.json()["detail"]


async def test_hs256_public_key_secret_rejected(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """An HS256 token keyed with the registered public key's PEM gets 401 with a reason."""
    header = {"alg": "HS256", "typ": "JWT", "kid": jwk_thumbprint(device_key.public_key())}
    token = hand_made_token(header, claims_for(device_id), hmac_secret=public_pem(device_key))
    response = await post_batch(client, token, batch(device_id, range(1, 3)))
    assert response.status_code == 401
    assert response.json()["reason"] == "algorithm_not_allowed"


async def test_wrong_audience_rejected(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A token for another audience gets 401 naming the expected audience."""
    token = es256_token(device_key, device_id, aud="someone-else")
    response = await post_batch(client, token, batch(device_id, range(1, 3)))
    assert response.status_code == 401
    assert response.json()["reason"] == "wrong_audience"
    assert AUDIENCE in response.json()["detail"]


async def test_expired_token_rejected(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A token 40 s past its exp (beyond the 30 s leeway) gets 401 with a reason."""
    now = int(time.time())
    token = es256_token(device_key, device_id, iat=now - 340, exp=now - 40)
    response = await post_batch(client, token, batch(device_id, range(1, 3)))
    assert response.status_code == 401
    assert response.json()["reason"] == "expired"


async def test_expired_within_leeway_accepted(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A token 10 s past its exp is still inside the leeway and accepted."""
    now = int(time.time())
    token = es256_token(device_key, device_id, iat=now - 310, exp=now - 10)
    response = await post_batch(client, token, batch(device_id, range(1, 3)))
    assert response.status_code == 200


async def test_reused_jti_rejected(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """The same token sent twice is accepted once, then gets 401 for the reused jti."""
    token = es256_token(device_key, device_id)
    first = await post_batch(client, token, batch(device_id, range(1, 3)))
    second = await post_batch(client, token, batch(device_id, range(3, 5)))
    assert first.status_code == 200
    assert second.status_code == 401
    assert second.json()["reason"] == "replayed_jti"


async def test_unknown_kid_rejected(client: httpx.AsyncClient, device_id: str) -> None:
    """A token signed by a key that was never registered gets 401 naming the kid."""
    stranger = ec.generate_private_key(ec.SECP256R1())
    response = await post_batch(client, es256_token(stranger, device_id), batch(device_id, [1]))
    assert response.status_code == 401
    assert response.json()["reason"] == "unknown_kid"
    assert jwk_thumbprint(stranger.public_key()) in response.json()["detail"]


async def test_missing_token_rejected(client: httpx.AsyncClient, device_id: str) -> None:
    """A request without Authorization gets 401 and a Bearer challenge."""
    response = await post_batch(client, None, batch(device_id, [1]))
    assert response.status_code == 401
    assert response.json()["reason"] == "missing_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@dataclass(frozen=True)
class _FromNow:
    """A claim time this many seconds after the test starts, not after collection."""

    seconds: int


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"jti": None}, "missing_claim"),
        ({"iat": None}, "missing_claim"),
        ({"iss": "another-device"}, "invalid_claim"),
        ({"exp": _FromNow(3600)}, "invalid_claim"),
        ({"iat": _FromNow(120)}, "not_yet_valid"),
    ],
    ids=["no-jti", "no-iat", "iss-not-sub", "lifetime-1h", "iat-future"],
)
async def test_bad_claims_rejected(
    client: httpx.AsyncClient,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
    overrides: dict[str, Any],
    reason: str,
) -> None:
    """Missing jti or iat, iss other than sub, a lifetime over 10 min or a future iat get 401."""
    now = int(time.time())
    claims = {
        key: now + value.seconds if isinstance(value, _FromNow) else value
        for key, value in overrides.items()
    }
    token = es256_token(device_key, device_id, **claims)
    response = await post_batch(client, token, batch(device_id, [1]))
    assert response.status_code == 401
    assert response.json()["reason"] == reason


async def test_removed_key_rejected_then_restored(
    client: httpx.AsyncClient,
    service: CloudService,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
) -> None:
    """A key removed from the folder gets 401 at once; registering it again restores access."""
    kid = jwk_thumbprint(device_key.public_key())
    service.unregister_key(kid)
    try:
        removed = await post_batch(
            client, es256_token(device_key, device_id), batch(device_id, [1])
        )
    finally:
        service.register_key(public_pem(device_key))
    restored = await post_batch(client, es256_token(device_key, device_id), batch(device_id, [1]))
    assert removed.status_code == 401
    assert removed.json()["reason"] == "unknown_kid"
    assert restored.status_code == 200


async def test_device_mismatch_forbidden(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A batch whose device_id is not the token's sub gets 403 and stores nothing."""
    token = es256_token(device_key, device_id)
    response = await post_batch(client, token, batch("some-other-device", [1, 2]))
    assert response.status_code == 403
    assert response.json()["reason"] == "device_mismatch"
    stored = await get_json(client, "/v1/devices/some-other-device/readings")
    assert stored["readings"] == []


# --- ingest (service under uvicorn) -----------------------------------------------


async def test_gzip_round_trip(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A gzip batch is stored and read back through the readings endpoint unchanged."""
    body = batch(device_id, range(1, 11))
    body["readings"][4] = reading(5, value=None, quality="bad")
    response = await post_batch(client, es256_token(device_key, device_id), body)
    stored = await get_json(client, f"/v1/devices/{device_id}/readings")
    assert response.status_code == 200
    assert response.json() == {"accepted": 10, "duplicates": 0}
    assert [r["seq"] for r in stored["readings"]] == list(range(1, 11))
    assert stored["readings"][0] == {"rig_id": "rig-07", **reading(1)}
    assert stored["readings"][4]["value"] is None
    assert stored["readings"][4]["quality"] == "bad"


async def test_plain_json_accepted(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A body without Content-Encoding is accepted as plain JSON."""
    token = es256_token(device_key, device_id)
    response = await post_batch(client, token, batch(device_id, range(1, 4)), compress=False)
    assert response.status_code == 200
    assert response.json() == {"accepted": 3, "duplicates": 0}


async def test_duplicates_counted_not_stored(
    client: httpx.AsyncClient,
    service: CloudService,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
) -> None:
    """Readings sent again are counted as duplicates and stored once."""
    first = await post_batch(
        client, es256_token(device_key, device_id), batch(device_id, range(1, 11))
    )
    again = await post_batch(
        client, es256_token(device_key, device_id), batch(device_id, range(6, 16))
    )
    stats = await service.device_stats(device_id)
    stored = await service.readings(device_id)
    assert first.json() == {"accepted": 10, "duplicates": 0}
    assert again.json() == {"accepted": 5, "duplicates": 5}
    assert stats["readings"] == 15
    assert stats["duplicates"] == 5
    assert [r["seq"] for r in stored] == list(range(1, 16))


async def test_invalid_reading_names_seq(
    client: httpx.AsyncClient, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A batch with invalid readings gets 422 naming the first one's index and seq, storing none."""
    body = batch(device_id, range(100, 106))
    body["readings"][3]["value"] = "not a number"
    body["readings"][5]["value"] = "not a number either"
    response = await post_batch(client, es256_token(device_key, device_id), body)
    detail = response.json()["detail"]
    stored = await get_json(client, f"/v1/devices/{device_id}/readings")
    assert response.status_code == 422
    assert detail["index"] == 3
    assert detail["seq"] == 103
    assert detail["errors"][0]["loc"] == ["readings", 3, "value"]
    assert stored["readings"] == []


async def test_restart_keeps_readings(
    device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """After a stop and a start on the same port, stored readings and counters are still there."""
    cloud = CloudService()
    try:
        cloud.register_key(public_pem(device_key))
        cloud.start()
        port = cloud.port
        async with httpx.AsyncClient(base_url=cloud.base_url) as http:
            await post_batch(
                http, es256_token(device_key, device_id), batch(device_id, range(1, 6))
            )
        cloud.stop()
        cloud.start()
        async with httpx.AsyncClient(base_url=cloud.base_url) as http:
            again = await post_batch(
                http, es256_token(device_key, device_id), batch(device_id, range(1, 8))
            )
        stats = await cloud.device_stats(device_id)
        assert cloud.port == port
        assert again.json() == {"accepted": 2, "duplicates": 5}
        assert stats["readings"] == 7
        assert stats["duplicates"] == 5
        assert stats["retried_batches"] == 0
    finally:
        cloud.close()


# --- faults (service under uvicorn) -----------------------------------------------


async def test_fault_429_retry_after(
    client: httpx.AsyncClient,
    faults: CloudService,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
) -> None:
    """An injected 429 carries Retry-After and applies to one request only."""
    await faults.inject_fault(status=429, retry_after=2)
    limited = await post_batch(client, es256_token(device_key, device_id), batch(device_id, [1]))
    after = await post_batch(client, es256_token(device_key, device_id), batch(device_id, [1]))
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "2"
    assert after.status_code == 200


async def test_fault_503_count(
    client: httpx.AsyncClient,
    faults: CloudService,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
) -> None:
    """An injected 503 with count 2 fails exactly the next two requests."""
    await faults.inject_fault(status=503, count=2)
    statuses = [
        (
            await post_batch(client, es256_token(device_key, device_id), batch(device_id, [1]))
        ).status_code
        for _ in range(3)
    ]
    assert statuses == [503, 503, 200]


async def test_fault_401(
    client: httpx.AsyncClient,
    faults: CloudService,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
) -> None:
    """An injected 401 rejects one request with a valid token; the next one passes."""
    await faults.inject_fault(status=401)
    rejected = await post_batch(client, es256_token(device_key, device_id), batch(device_id, [1]))
    after = await post_batch(client, es256_token(device_key, device_id), batch(device_id, [1]))
    assert rejected.status_code == 401
    assert rejected.json()["reason"] == "injected_fault"
    assert after.status_code == 200


async def test_fault_reject_seq(
    client: httpx.AsyncClient,
    faults: CloudService,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
) -> None:
    """A seq fault gets 422 naming that seq for every batch holding it, and none for the others."""
    await faults.inject_fault(reject_seq=1234)
    holding = batch(device_id, range(1230, 1240))
    first = await post_batch(client, es256_token(device_key, device_id), holding)
    second = await post_batch(client, es256_token(device_key, device_id), holding)
    other = await post_batch(client, es256_token(device_key, device_id), batch(device_id, [1]))
    assert first.status_code == 422
    assert first.json()["detail"]["seq"] == 1234
    assert first.json()["detail"]["index"] == 4
    assert second.status_code == 422
    assert other.status_code == 200


async def test_fault_after_store(
    client: httpx.AsyncClient,
    faults: CloudService,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
) -> None:
    """A fault after storage returns 503 for a stored batch, so the retry is all duplicates."""
    await faults.inject_fault(status=503, after_store=True)
    body = batch(device_id, range(1, 6))
    lost = await post_batch(client, es256_token(device_key, device_id), body)
    retry = await post_batch(client, es256_token(device_key, device_id), body)
    stats = await faults.device_stats(device_id)
    assert lost.status_code == 503
    assert retry.json() == {"accepted": 0, "duplicates": 5}
    assert stats["retried_batches"] == 1


async def test_fault_body_validated(client: httpx.AsyncClient, faults: CloudService) -> None:
    """A fault with both a status and a seq is rejected with 422 and nothing is queued."""
    async with asyncio.timeout(NETWORK_TIMEOUT):
        response = await client.post("/_test/faults", json={"status": 503, "reject_seq": 5})
    pending = await get_json(client, "/_test/faults")
    assert response.status_code == 422
    assert pending["pending"] == []


# --- queries and docs (service under uvicorn) -------------------------------------


async def test_stats_counts_rejections(
    client: httpx.AsyncClient,
    service: CloudService,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
) -> None:
    """Stats show seq range, requests and rejections by reason for a device."""
    token = es256_token(device_key, device_id)
    await post_batch(client, token, batch(device_id, range(7, 10)))
    bad = batch(device_id, [10])
    bad["readings"][0]["quality"] = "excellent"
    await post_batch(client, es256_token(device_key, device_id), bad)
    stats = await service.device_stats(device_id)
    assert stats["min_seq"] == 7
    assert stats["max_seq"] == 9
    assert stats["requests"] == 2
    assert stats["batches"] == 1
    assert stats["rejected"] == {"invalid_reading": 1}


async def test_docs_served(client: httpx.AsyncClient) -> None:
    """Swagger UI is served at /docs and the OpenAPI document describes the batch body."""
    async with asyncio.timeout(NETWORK_TIMEOUT):
        docs = await client.get("/docs")
    schema = await get_json(client, "/openapi.json")
    body = schema["paths"]["/v1/readings"]["post"]["requestBody"]
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/ReadingBatch")
    assert "ReadingIn" in schema["components"]["schemas"]


# --- finer cases (app in this process) --------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "named_seq"),
    [
        ("seq", 0, 0),
        ("seq", "12", None),
        ("seq", True, None),
        ("ts", "2024-05-01 12:00:00", 2),
        ("ts", "2024-05-01T12:00:00+02:00", 2),
        ("ts", "2024-13-01T12:00:00Z", 2),
        ("channel", "", 2),
        ("value", True, 2),
        ("unit", None, 2),
        ("quality", "excellent", 2),
    ],
)
async def test_reading_field_rejected(
    in_process: AppFactory,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
    field: str,
    value: Any,
    named_seq: int | None,
) -> None:
    """A reading with an invalid field gets 422 naming its index and its seq when that is an int."""
    http = await in_process()
    body = batch(device_id, [1, 2, 3])
    body["readings"][1][field] = value
    response = await post_batch(http, es256_token(device_key, device_id), body)
    assert response.status_code == 422
    assert response.json()["detail"]["index"] == 1
    assert response.json()["detail"]["seq"] == named_seq


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_value_rejected(
    in_process: AppFactory, device_key: ec.EllipticCurvePrivateKey, device_id: str, literal: str
) -> None:
    """NaN and infinite values get 422 naming the reading, not 400 for the whole body."""
    http = await in_process()
    text = json.dumps(batch(device_id, [1, 2])).replace("1002.0", literal)
    response = await post_batch(http, es256_token(device_key, device_id), text.encode())
    assert response.status_code == 422
    assert response.json()["detail"]["seq"] == 2


async def test_envelope_errors_have_no_index(
    in_process: AppFactory, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A batch without readings gets 422 whose detail names no reading."""
    http = await in_process()
    body = {"device_id": device_id, "rig_id": "rig-07", "readings": []}
    response = await post_batch(http, es256_token(device_key, device_id), body)
    assert response.status_code == 422
    assert response.json()["reason"] == "invalid_batch"
    assert response.json()["detail"]["index"] is None


async def test_timestamp_normalised(
    in_process: AppFactory, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """Timestamps in +00:00 or short-fraction form are stored with six fractional digits and Z."""
    http = await in_process()
    body = batch(device_id, [1])
    body["readings"][0]["ts"] = "2024-05-01T12:00:00.5+00:00"
    await post_batch(http, es256_token(device_key, device_id), body)
    stored = await get_json(http, f"/v1/devices/{device_id}/readings")
    assert stored["readings"][0]["ts"] == "2024-05-01T12:00:00.500000Z"


async def test_body_too_large(
    in_process: AppFactory, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A body above the size limit gets 413, whether it arrives plain or compressed."""
    http = await in_process(max_body_bytes=2000)
    big = batch(device_id, range(1, 41))
    plain = await post_batch(http, es256_token(device_key, device_id), big, compress=False)
    compressed = await post_batch(http, es256_token(device_key, device_id), big)
    small = await post_batch(http, es256_token(device_key, device_id), batch(device_id, [1]))
    assert len(gzip.compress(json.dumps(big).encode())) < 2000
    assert plain.status_code == 413
    assert compressed.status_code == 413
    assert compressed.json()["detail"]["limit"] == 2000
    assert small.status_code == 200


async def test_gzip_bomb_stopped(
    in_process: AppFactory, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A small gzip body that inflates past the limit gets 413."""
    http = await in_process(max_body_bytes=100_000)
    bomb = gzip.compress(b" " * 50_000_000)
    response = await post_batch(
        http,
        es256_token(device_key, device_id),
        bomb,
        compress=False,
        headers={"Content-Encoding": "gzip"},
    )
    assert len(bomb) < 100_000
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("content", "encoding", "reason"),
    [
        (b"{not json", None, "invalid_json"),
        (b"\xff\xfe\x00garbage", None, "invalid_json"),
        (b"plain text, not gzip", "gzip", "invalid_gzip"),
        (gzip.compress(b'{"device_id": "x"}')[:-6], "gzip", "invalid_gzip"),
    ],
    ids=["not-json", "not-utf8", "not-gzip", "truncated-gzip"],
)
async def test_undecodable_body_400(
    in_process: AppFactory,
    device_key: ec.EllipticCurvePrivateKey,
    device_id: str,
    content: bytes,
    encoding: str | None,
    reason: str,
) -> None:
    """A body that is not JSON, or not gzip despite its Content-Encoding, gets 400."""
    http = await in_process()
    headers = {"Content-Encoding": encoding} if encoding else {}
    token = es256_token(device_key, device_id)
    response = await post_batch(http, token, content, compress=False, headers=headers)
    assert response.status_code == 400
    assert response.json()["reason"] == reason


async def test_unsupported_encoding_415(
    in_process: AppFactory, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """A Content-Encoding other than gzip gets 415."""
    http = await in_process()
    response = await post_batch(
        http,
        es256_token(device_key, device_id),
        batch(device_id, [1]),
        compress=False,
        headers={"Content-Encoding": "br"},
    )
    assert response.status_code == 415


async def test_faults_off_by_default(in_process: AppFactory) -> None:
    """Without the test-faults setting, /_test/faults does not exist."""
    http = await in_process()
    async with asyncio.timeout(NETWORK_TIMEOUT):
        response = await http.post("/_test/faults", json={"status": 503})
    assert response.status_code == 404


async def test_readings_paged(
    in_process: AppFactory, device_key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """The readings endpoint pages by after_seq and limit and returns where the next page starts."""
    http = await in_process()
    await post_batch(http, es256_token(device_key, device_id), batch(device_id, range(1, 26)))
    first = await get_json(http, f"/v1/devices/{device_id}/readings", limit=10)
    middle = await get_json(http, f"/v1/devices/{device_id}/readings", after_seq=10, limit=10)
    last = await get_json(http, f"/v1/devices/{device_id}/readings", after_seq=20, limit=10)
    assert [r["seq"] for r in first["readings"]] == list(range(1, 11))
    assert first["next_after_seq"] == 10
    assert [r["seq"] for r in middle["readings"]] == list(range(11, 21))
    assert [r["seq"] for r in last["readings"]] == list(range(21, 26))
    assert last["next_after_seq"] is None


async def test_unauthenticated_rejections_counted(in_process: AppFactory, device_id: str) -> None:
    """Requests rejected before authentication are counted by reason outside any device."""
    http = await in_process()
    await post_batch(http, None, batch(device_id, [1]))
    await post_batch(http, "not-a-jwt", batch(device_id, [1]))
    stats = await get_json(http, "/v1/stats")
    assert stats["unauthenticated"]["rejected"] == {"missing_token": 1, "malformed_token": 1}
    assert device_id not in stats["devices"]


# --- units ------------------------------------------------------------------------


def parse(body: dict[str, Any] | bytes, device_id: str = "edge-1") -> ReadingBatch:
    """Run `parse_batch` on a plain JSON body, as the readings route does."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_batch(raw, None, limit=1_000_000, device_id=device_id)


def rejection(body: dict[str, Any] | bytes, device_id: str = "edge-1") -> IngestRejected:
    with pytest.raises(IngestRejected) as caught:
        parse(body, device_id)
    return caught.value


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2024-05-01T12:00:00.000001Z", "2024-05-01T12:00:00.000001Z"),
        ("2024-02-29T23:59:59.999999Z", "2024-02-29T23:59:59.999999Z"),
        ("2024-05-01T12:00:00Z", "2024-05-01T12:00:00.000000Z"),
        ("2024-05-01T12:00:00.5Z", "2024-05-01T12:00:00.500000Z"),
        ("2024-05-01T12:00:00.000001+00:00", "2024-05-01T12:00:00.000001Z"),
        ("2024-05-01t12:00:00.000001z", "2024-05-01T12:00:00.000001Z"),
    ],
)
def test_timestamp_forms_accepted(sent: str, stored: str) -> None:
    """The agent's form is stored as sent, and other UTC forms are converted to it."""
    body = batch("edge-1", [1, 2])
    body["readings"][1]["ts"] = sent
    assert parse(body).readings[1]["ts"] == stored


@pytest.mark.parametrize(
    "sent",
    [
        "2024-02-30T12:00:00.000000Z",
        "2023-02-29T12:00:00.000000Z",
        "2024-05-01T24:00:00.000000Z",
        "2024-05-01T12:60:00.000000Z",
        "2024-05-01T12:00:00.000001+01:00",
        "2024-05-01T12:00:00.000001-05:00",
        "2024-05-01T12:00:00.000001",
        "2024-05-01T12:00:00.0000001Z",
        "2024-05-01T12:00:00.00000\u0663Z",
        "2024-05-01T12:00:00.000001Z ",
    ],
)
def test_timestamp_forms_rejected(sent: str) -> None:
    """Impossible dates, offsets other than UTC and malformed text get 422 naming the seq.

    The agent's exact form is checked on a fast path, which must not let these through.
    """
    body = batch("edge-1", [7, 8, 9])
    body["readings"][1]["ts"] = sent
    error = rejection(body)
    assert (error.status, error.reason) == (422, "invalid_reading")
    assert (error.detail["index"], error.detail["seq"]) == (1, 8)
    assert error.detail["errors"][0]["loc"] == ["readings", 1, "ts"]


def test_timestamp_time_of_day_checked() -> None:
    """A valid reading does not vouch for a later one of the same day at an impossible time."""
    body = batch("edge-1", [1, 2])
    body["readings"][0]["ts"] = "2024-06-01T12:00:00.000001Z"
    body["readings"][1]["ts"] = "2024-06-01T12:00:61.000001Z"
    assert rejection(body).detail["seq"] == 2


def test_large_batch_parsed_in_order() -> None:
    """A batch of the agent's size comes back whole, in order, with its values unchanged."""
    body = batch("edge-1", range(1, 5001))
    body["readings"][2500] = reading(2501, value=None, quality="bad")
    parsed = parse(body)
    assert [r["seq"] for r in parsed.readings] == list(range(1, 5001))
    assert parsed.readings[0] == reading(1)
    assert parsed.readings[2500]["value"] is None


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-16"),
        lambda text: b"\xef\xbb\xbf" + text.encode(),
    ],
    ids=["utf-16", "utf-8-bom"],
)
def test_utf16_and_bom_bodies_parsed(encode: Callable[[str], bytes]) -> None:
    """Bodies that json.loads reads but pydantic's JSON parser rejects are accepted."""
    parsed = parse(encode(json.dumps(batch("edge-1", [1, 2]))))
    assert [r["seq"] for r in parsed.readings] == [1, 2]


def test_seq_beyond_64_bits_named() -> None:
    """A seq too large for SQLite gets 422 naming that seq exactly."""
    text = json.dumps(batch("edge-1", [1, 2])).replace('"seq": 2,', '"seq": 36893488147419103232,')
    error = rejection(text.encode())
    assert (error.status, error.detail["index"], error.detail["seq"]) == (422, 1, 2**65)


def test_other_device_rejected_before_validation() -> None:
    """Another device's batch gets 403, whether or not the batch is valid."""
    invalid = batch("edge-2", [1, 2])
    invalid["readings"][1]["quality"] = "excellent"
    assert rejection(batch("edge-2", [1, 2])).status == 403
    assert rejection(invalid).status == 403


async def test_store_on_rowid_readings_table(tmp_path: Path) -> None:
    """A database made with a rowid table and a UNIQUE index still removes duplicate seqs."""
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "CREATE TABLE readings (device_id TEXT NOT NULL, seq INTEGER NOT NULL, "
            "rig_id TEXT NOT NULL, ts TEXT NOT NULL, channel TEXT NOT NULL, value REAL, "
            "unit TEXT NOT NULL, quality TEXT NOT NULL, UNIQUE (device_id, seq))"
        )
    store = ReadingStore(str(path))
    await store.open()
    try:
        readings = parse(batch("edge-1", range(1, 6))).readings
        first = await store.add_batch("edge-1", "rig-07", readings, "edge-1:1-5")
        again = await store.add_batch("edge-1", "rig-07", readings[2:], "edge-1:3-5")
        rows = await store.readings("edge-1", 0, 10)
    finally:
        await store.close()
    assert (first.accepted, first.duplicates) == (5, 0)
    assert (again.accepted, again.duplicates) == (0, 3)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]


def test_jti_cache_forgets_expired() -> None:
    """A jti is refused while remembered and accepted again once its time has passed."""
    now = [1000.0]
    cache = JtiCache(clock=lambda: now[0])
    assert cache.use("a", until=1030.0)
    assert not cache.use("a", until=1030.0)
    now[0] = 1031.0
    assert cache.use("a", until=1060.0)
    assert len(cache) == 1


def test_registry_reads_jwk_files(tmp_path: Path, device_key: ec.EllipticCurvePrivateKey) -> None:
    """A `*.jwk.json` key file is registered under its thumbprint; a broken file is skipped."""
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(device_key.public_key(), as_dict=True)
    (tmp_path / "edge.jwk.json").write_text(json.dumps(jwk))
    (tmp_path / "broken.pem").write_text("not a key")
    registry = KeyRegistry(tmp_path)
    assert registry.kids() == [jwk_thumbprint(device_key.public_key())]


def test_private_key_file_refused(tmp_path: Path, device_key: ec.EllipticCurvePrivateKey) -> None:
    """A private key put in the key folder is refused with a message naming the file."""
    path = tmp_path / "oops.pem"
    path.write_bytes(
        device_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match=r"oops\.pem"):
        load_public_key(path)


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ("cloud.db", "cloud.db"),
        ("sqlite:///cloud.db", "cloud.db"),
        ("sqlite:////var/lib/cloud.db", "/var/lib/cloud.db"),
        ("sqlite://", ":memory:"),
    ],
)
def test_sqlite_path(setting: str, path: str) -> None:
    """The db setting accepts a path or a sqlite URL."""
    assert sqlite_path(setting) == path


def test_other_database_url_refused() -> None:
    """A non-SQLite URL is refused without echoing the rest of the URL."""
    with pytest.raises(ValueError, match="'postgresql'") as caught:
        sqlite_path("postgresql://user:secret@db/ingest")
    assert "secret" not in str(caught.value)


def test_settings_from_env(tmp_path: Path) -> None:
    """RIG_CLOUD_* variables set the database, keys folder, audience, size limit and faults."""
    settings = CloudSettings.from_env(
        {
            "RIG_CLOUD_DB": "sqlite:///x.db",
            "RIG_CLOUD_KEYS_DIR": str(tmp_path),
            "RIG_CLOUD_AUDIENCE": "ops",
            "RIG_CLOUD_MAX_BODY_BYTES": "5000",
            "RIG_CLOUD_TEST_FAULTS": "1",
        }
    )
    assert settings == CloudSettings(
        db="sqlite:///x.db",
        keys_dir=tmp_path,
        audience="ops",
        max_body_bytes=5000,
        test_faults=True,
    )


def test_register_key_cli(
    tmp_path: Path, device_key: ec.EllipticCurvePrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    """`register-key` stores the key under its kid and prints it; `unregister-key` removes it."""
    source = tmp_path / "device.pub.pem"
    source.write_bytes(public_pem(device_key))
    keys_dir = tmp_path / "keys"
    kid = jwk_thumbprint(device_key.public_key())
    registered = cloud_main(["register-key", "--keys-dir", str(keys_dir), str(source)])
    printed = capsys.readouterr().out
    unregistered = cloud_main(["unregister-key", "--keys-dir", str(keys_dir), kid])
    assert registered == 0
    assert kid in printed
    assert unregistered == 0
    assert list(keys_dir.glob("*.pem")) == []


def test_register_key_cli_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`register-key` with a file that is not a public key exits 1 naming the file."""
    source = tmp_path / "notes.txt"
    source.write_text("hello")
    code = cloud_main(["register-key", "--keys-dir", str(tmp_path / "keys"), str(source)])
    assert code == 1
    assert "notes.txt" in capsys.readouterr().err


async def test_uvicorn_app_from_env(tmp_path: Path) -> None:
    """`uvicorn cloud.app:app` takes its settings from RIG_CLOUD_* variables."""
    port = free_port()
    env = os.environ | {
        "RIG_CLOUD_DB": f"sqlite:///{tmp_path / 'env.db'}",
        "RIG_CLOUD_KEYS_DIR": str(tmp_path / "keys"),
        "RIG_CLOUD_TEST_FAULTS": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "cloud.app:app", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--log-level", "warning"]
    proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await asyncio.to_thread(wait_for_port, port, 15)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            faults = await get_json(http, "/_test/faults")
        assert faults == {"pending": []}
        assert (tmp_path / "env.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
