"""Shared fixtures: real peers started on loopback for each test that requests them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.peers import Mosquitto

XSD_DIR_VARIABLE = "RIG_AGENT_WITSML_XSD_DIR"
"""Folder of the WITSML 1.4.1.1 schemas (obj_log.xsd and the files it includes)."""
REQUIRE_XSD_VARIABLE = "RIG_AGENT_REQUIRE_WITSML_XSD"
"""When set to 1, a missing schema folder fails the run instead of skipping the schema tests."""

_schema_uses = 0


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """A private mosquitto on a free 127.0.0.1 port, stopped after the test."""
    broker = Mosquitto()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def witsml_xsd_dir() -> Path:
    """The folder of the WITSML 1.4.1.1 schemas, from $RIG_AGENT_WITSML_XSD_DIR.

    Without the variable the test is reported as not run (skipped), unless
    $RIG_AGENT_REQUIRE_WITSML_XSD is 1, as in CI, where it fails.
    """
    value = os.environ.get(XSD_DIR_VARIABLE, "")
    folder = Path(value) if value else None
    if folder is None or not (folder / "obj_log.xsd").is_file():
        reason = (
            f"WITSML schema tests not run: {XSD_DIR_VARIABLE}={value!r} is not a folder "
            "holding obj_log.xsd; set it to the folder of the WITSML 1.4.1.1 schemas"
        )
        if os.environ.get(REQUIRE_XSD_VARIABLE) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return folder.resolve()


@pytest.fixture(scope="session")
def witsml_log_schema(witsml_xsd_dir: Path) -> etree.XMLSchema:
    """The parsed `obj_log.xsd` schema; every use is counted for the end-of-run check."""
    return etree.XMLSchema(etree.parse(str(witsml_xsd_dir / "obj_log.xsd")))


@pytest.fixture
def assert_witsml_valid(witsml_log_schema: etree.XMLSchema) -> Callable[[bytes], None]:
    """A function that asserts one WITSML document (bytes) is valid against obj_log.xsd."""

    def check(document: bytes) -> None:
        global _schema_uses
        tree = etree.fromstring(document)
        valid = witsml_log_schema.validate(tree)
        _schema_uses += 1
        assert valid, f"document invalid against obj_log.xsd: {witsml_log_schema.error_log}"

    return check


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail a run that requires the schema tests when no document was checked against the XSD."""
    if os.environ.get(REQUIRE_XSD_VARIABLE) != "1":
        return
    if _schema_uses == 0 and session.testscollected > 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(
            f"\nerror: {REQUIRE_XSD_VARIABLE}=1 but no WITSML document was validated "
            "against obj_log.xsd in this run"
        )
