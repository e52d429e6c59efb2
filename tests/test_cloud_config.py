"""The [cloud] config table: defaults, URL rules, token lifetime, key file lookup and summary."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from config.loader import ConfigError, load_config, summarize
from config.model import CloudSection, Config
from uplink.auth import jwk_thumbprint, load_private_key, resolve_secret_path

EXAMPLE = Path(__file__).parents[1] / "config" / "examples" / "agent.toml"

AGENT = '[agent]\nrig_id = "rig-07"\n'


def cloud_table(url: str = "https://ingest.example.com", *extra: str) -> str:
    """Return a [cloud] table with the required keys, then each line of `extra`."""
    lines = [
        "[cloud]",
        f'url = "{url}"',
        'device_id = "rig-07-edge"',
        'private_key_file = "/etc/rig-agent/device-key.pem"',
        *extra,
    ]
    return "\n".join(lines) + "\n"


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path)


def error_text(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return str(caught.value)


def write_key(path: Path, mode: int = 0o600) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(mode)
    return key


# --- The section and its defaults -------------------------------------------------


def test_cloud_defaults(tmp_path: Path) -> None:
    """A [cloud] table with only the required keys gets the documented defaults."""
    cloud = load(tmp_path, AGENT + cloud_table()).cloud
    assert cloud is not None
    assert cloud.audience == "rig-cloud"
    assert cloud.batch_max_readings == 5000
    assert cloud.interval == 5.0
    assert cloud.token_lifetime == 300.0
    assert cloud.timeout == 30.0
    assert cloud.allow_insecure_http is False
    assert cloud.ca_file == ""


def test_cloud_absent_by_default(tmp_path: Path) -> None:
    """Without a [cloud] table the cloud sink is off."""
    config = load(tmp_path, AGENT)
    assert config.cloud is None
    assert config.enabled_sinks() == []


def test_enabled_sinks_order(tmp_path: Path) -> None:
    """With [mqtt] and [cloud] both present the sinks are listed as mqtt, then cloud."""
    config = load(tmp_path, AGENT + cloud_table() + '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n')
    assert config.enabled_sinks() == ["mqtt", "cloud"]


def test_cloud_only_sink(tmp_path: Path) -> None:
    """A [cloud] table alone enables just the cloud sink."""
    assert load(tmp_path, AGENT + cloud_table()).enabled_sinks() == ["cloud"]


def test_cloud_durations_parsed(tmp_path: Path) -> None:
    """Durations in [cloud] are strings with units, such as "10m" and "500ms"."""
    text = AGENT + cloud_table(
        "https://ingest.example.com",
        'token_lifetime = "10m"',
        'interval = "500ms"',
        'timeout = "1m"',
    )
    cloud = load(tmp_path, text).cloud
    assert cloud is not None
    assert cloud.token_lifetime == 600.0
    assert cloud.interval == 0.5
    assert cloud.timeout == 60.0


def test_base_url_strips_slash() -> None:
    """base_url drops a trailing slash so that paths can be appended."""
    cloud = CloudSection(
        url="https://ingest.example.com/rig-api/", device_id="d", private_key_file="k.pem"
    )
    assert cloud.base_url == "https://ingest.example.com/rig-api"


# --- URL rules --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://10.20.0.5:8000", "http://ingest.example.com", "http://[2001:db8::1]:8000"],
)
def test_plain_http_remote_rejected(tmp_path: Path, url: str) -> None:
    """Plain http:// to a host that is not loopback is an error naming the URL and the key."""
    text = error_text(tmp_path, AGENT + cloud_table(url))
    assert f"cloud URL {url!r} uses plain http://" in text
    assert "allow_insecure_http = true" in text
    assert "agent.toml:4: cloud.url" in text


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.45.6.7:8000",
        "http://localhost:8000",
        "http://LOCALHOST",
        "http://[::1]:8000/base",
    ],
)
def test_plain_http_loopback_allowed(tmp_path: Path, url: str) -> None:
    """Plain http:// to a loopback host is accepted without allow_insecure_http."""
    cloud = load(tmp_path, AGENT + cloud_table(url)).cloud
    assert cloud is not None
    assert cloud.is_loopback is True


def test_insecure_http_allowed_by_key(tmp_path: Path) -> None:
    """allow_insecure_http = true accepts plain http:// to any host."""
    text = AGENT + cloud_table("http://10.20.0.5", "allow_insecure_http = true")
    cloud = load(tmp_path, text).cloud
    assert cloud is not None
    assert cloud.url == "http://10.20.0.5"


def test_https_remote_accepted(tmp_path: Path) -> None:
    """An https:// URL with a port and a base path is accepted."""
    cloud = load(tmp_path, AGENT + cloud_table("https://ingest.example.com:8443/rigs")).cloud
    assert cloud is not None
    assert cloud.is_tls is True
    assert cloud.host == "ingest.example.com"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://ingest.example.com", "invalid cloud URL"),
        ("https://", "invalid cloud URL"),
        ("ingest.example.com", "invalid cloud URL"),
        ("https://ingest.example.com:99999", "invalid port in cloud URL"),
        ("https://ingest.example.com/?token=1", "has a query or fragment"),
        ("https://user:pw@ingest.example.com", "contains a user name or password"),
    ],
)
def test_invalid_urls(tmp_path: Path, url: str, fragment: str) -> None:
    """A URL that is not https://host[:port][/path] is an error at the url key."""
    text = error_text(tmp_path, AGENT + cloud_table(url))
    assert fragment in text
    assert "cloud.url" in text


def test_url_password_not_repeated(tmp_path: Path) -> None:
    """The message about a password in the URL does not repeat the password itself."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, AGENT + cloud_table("https://user:s3cret@ingest.example.com"))
    assert "s3cret" not in caught.value.issues[0].message


# --- Other keys -------------------------------------------------------------------


def test_token_lifetime_over_10m(tmp_path: Path) -> None:
    """A token_lifetime over 10 minutes is an error at that key."""
    text = error_text(
        tmp_path, AGENT + cloud_table("https://ingest.example.com", 'token_lifetime = "601s"')
    )
    assert "cloud.token_lifetime" in text
    assert "expected 1s to 10m" in text


def test_token_lifetime_under_1s(tmp_path: Path) -> None:
    """A token_lifetime under one second is an error, because token times are whole seconds."""
    text = error_text(
        tmp_path, AGENT + cloud_table("https://ingest.example.com", 'token_lifetime = "500ms"')
    )
    assert "expected 1s to 10m" in text


@pytest.mark.parametrize("key", ["url", "device_id", "private_key_file"])
def test_required_keys(tmp_path: Path, key: str) -> None:
    """Each required key of [cloud] is reported when it is missing."""
    lines = [line for line in cloud_table().splitlines() if not line.startswith(f"{key} =")]
    text = error_text(tmp_path, AGENT + "\n".join(lines) + "\n")
    assert f"cloud.{key}: missing required key" in text


def test_key_file_dot_rejected(tmp_path: Path) -> None:
    """private_key_file = ".." is rejected at load, as it names no file."""
    text = AGENT + cloud_table().replace("/etc/rig-agent/device-key.pem", "..")
    assert "invalid private_key_file" in error_text(tmp_path, text)


def test_unknown_cloud_key(tmp_path: Path) -> None:
    """A misspelt key in [cloud] is an error with a suggestion."""
    text = error_text(
        tmp_path, AGENT + cloud_table("https://ingest.example.com", "batch_max_reading = 10")
    )
    assert "did you mean 'batch_max_readings'?" in text


def test_key_file_not_checked_at_load(tmp_path: Path) -> None:
    """Loading a config does not read the key file, so a missing key is not a load error."""
    config = load(tmp_path, AGENT + cloud_table().replace("/etc/rig-agent", str(tmp_path)))
    assert config.cloud is not None


# --- Credentials lookup -----------------------------------------------------------


def test_credential_name_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare private_key_file name loads from $CREDENTIALS_DIRECTORY, as under systemd."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    key = write_key(credentials / "device-key.pem", 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    text = AGENT + cloud_table().replace("/etc/rig-agent/device-key.pem", "device-key.pem")
    cloud = load(tmp_path, text).cloud
    assert cloud is not None
    path = resolve_secret_path(cloud.private_key_file)
    assert path == credentials / "device-key.pem"
    assert jwk_thumbprint(load_private_key(path).public_key()) == jwk_thumbprint(key.public_key())


# --- Summary ----------------------------------------------------------------------


def test_summary_cloud_line(tmp_path: Path) -> None:
    """The summary shows the cloud URL, device, batch size and token lifetime."""
    summary = summarize(
        load(
            tmp_path, AGENT + cloud_table("https://ingest.example.com", "batch_max_readings = 2000")
        )
    )
    line = next(line for line in summary.splitlines() if line.startswith("sink cloud:"))
    assert "https://ingest.example.com, device rig-07-edge, audience rig-cloud" in line
    assert "up to 2000 readings per batch" in line
    assert "token lifetime 300s" in line


def test_summary_marks_insecure_http(tmp_path: Path) -> None:
    """The summary marks when plain http is allowed to a host that is not loopback."""
    text = AGENT + cloud_table("http://10.20.0.5", "allow_insecure_http = true")
    assert "plain http (allow_insecure_http)" in summarize(load(tmp_path, text))


def test_summary_key_kid(tmp_path: Path) -> None:
    """The summary shows the key file and the kid to compare with the registered key."""
    key = write_key(tmp_path / "device-key.pem")
    text = AGENT + cloud_table().replace("/etc/rig-agent", str(tmp_path))
    summary = summarize(load(tmp_path, text))
    expected = f"{tmp_path / 'device-key.pem'}, kid {jwk_thumbprint(key.public_key())}"
    assert expected in summary


def test_summary_key_missing(tmp_path: Path) -> None:
    """A missing key file shows as a warning in the summary, with keygen as the fix."""
    text = AGENT + cloud_table().replace("/etc/rig-agent", str(tmp_path))
    summary = summarize(load(tmp_path, text))
    assert "cloud key:" in summary
    assert "WARNING: private key file" in summary
    assert "rig-agent keygen --out" in summary


def test_summary_key_open_mode(tmp_path: Path) -> None:
    """A world-readable key file shows as a warning naming the chmod fix."""
    write_key(tmp_path / "device-key.pem", 0o644)
    text = AGENT + cloud_table().replace("/etc/rig-agent", str(tmp_path))
    summary = summarize(load(tmp_path, text))
    assert f"chmod 600 {tmp_path / 'device-key.pem'}" in summary


def test_summary_credential_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A credential name with $CREDENTIALS_DIRECTORY unset is described, not flagged."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    text = AGENT + cloud_table().replace("/etc/rig-agent/device-key.pem", "device-key.pem")
    summary = summarize(load(tmp_path, text))
    assert "credential 'device-key.pem' in $CREDENTIALS_DIRECTORY" in summary
    assert "WARNING" not in summary


def test_example_cloud_block_loads(tmp_path: Path) -> None:
    """The commented-out [cloud] table of the example is valid once uncommented."""
    text = EXAMPLE.read_text()
    start = text.index("# [cloud]")
    block = [line.removeprefix("#").removeprefix(" ") for line in text[start:].splitlines()]
    config = load(tmp_path, text[:start] + "\n".join(block) + "\n")
    assert config.cloud is not None
    assert config.cloud.url == "https://ingest.example.com"
    assert config.enabled_sinks() == ["mqtt", "cloud"]
