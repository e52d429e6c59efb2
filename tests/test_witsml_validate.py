"""`rig-agent witsml validate`: server rules, the schema, and unreadable input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from uplink.witsml_doc import Curve, LogHeader, Row, build_document

XSD_DIR_VARIABLE = "RIG_AGENT_WITSML_XSD_DIR"
ENERGISTICS = "energistics_example_log_depth_1411.xml"
DRILLFLOW = "drillflow_log_time_1411.xml"

HEADER = LogHeader("W-001", "Example 1H", "WB-001", "Example 1H OH", "L-1", "Time log", "-999.25")
CURVES = [Curve("SPPA", "psi", "SPPA"), Curve("RPM", "", "RPM", "rotary speed")]
ROWS = [
    Row(1_714_543_200_000_000, (1523.4, None)),
    Row(1_714_543_201_500_000, (1523.6, 120.0)),
]


def samples_dir() -> Path:
    """Return the folder of the WITSML samples, next to the repository or from the environment."""
    beside = Path(__file__).parents[2] / "shared" / "samples" / "witsml141"
    if beside.is_dir():
        return beside
    shared = os.environ.get("RIG_AGENT_SHARED_DIR")
    if shared:
        return Path(shared) / "samples" / "witsml141"
    return beside


def sample(name: str) -> Path:
    path = samples_dir() / name
    if not path.is_file():
        pytest.skip(f"sample {path} not found; set RIG_AGENT_SHARED_DIR to the shared folder")
    return path


@pytest.fixture(autouse=True)
def no_schema_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test without $RIG_AGENT_WITSML_XSD_DIR, so only --xsd-dir gives a schema."""
    monkeypatch.delenv(XSD_DIR_VARIABLE, raising=False)


def validate(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, list[str], str]:
    """Run the command in this process and return the exit code, stdout lines and stderr."""
    code = main(["witsml", "validate", *(str(a) for a in args)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def own_document(tmp_path: Path, data: bytes | None = None) -> Path:
    path = tmp_path / "log.xml"
    path.write_bytes(build_document(HEADER, CURVES, ROWS) if data is None else data)
    return path


def test_energistics_sample(capsys: pytest.CaptureFixture[str]) -> None:
    path = sample(ENERGISTICS)
    code, lines, _ = validate(capsys, path)
    assert code == 1
    assert lines[0] == (
        f"{path}:219: mnemonic 'Max - Min TQ' is used twice in this log (first on line 206): "
        "mnemonics must be unique"
    )
    assert lines[1] == (
        f"{path}:309: mnemonicList names 'Max - Min TQ' more than once: "
        "each curve may have one column"
    )
    assert lines[2] == (
        f"{path}:310: unitList entry 15 ('Max - Min TQ') is 'galUS' but its logCurveInfo "
        "on line 218 has unit 'galUS/min': the units must match"
    )
    assert lines[3] == (
        f"{path}:310: unitList entry 16 ('Pump p avg') is 'galUS' but its logCurveInfo "
        "on line 231 has unit 'galUS/min': the units must match"
    )
    assert lines[4] == f"{path}: 4 problems"
    assert lines[5].startswith(f"{path}: the XML schema was not checked; to check it, pass")
    assert len(lines) == 6


def test_drillflow_sample(capsys: pytest.CaptureFixture[str]) -> None:
    path = sample(DRILLFLOW)
    code, lines, _ = validate(capsys, path)
    assert code == 1
    assert lines[:3] == [
        f"{path}:26: index curve 'Time' has unit 'm', which is not a unit of time: "
        "use s or leave the unit out",
        f"{path}:34: index curve 'Time' has typeLogData 'double': the index of a date time "
        'log needs typeLogData "date time"',
        f"{path}: 2 problems",
    ]
    assert "--xsd-dir DIR or set $RIG_AGENT_WITSML_XSD_DIR" in lines[3]


@pytest.mark.parametrize(("name", "count"), [(ENERGISTICS, 4), (DRILLFLOW, 2)])
def test_samples_schema_valid(
    capsys: pytest.CaptureFixture[str], witsml_xsd_dir: Path, name: str, count: int
) -> None:
    path = sample(name)
    code, lines, _ = validate(capsys, path, "--xsd-dir", witsml_xsd_dir)
    assert code == 1
    assert not [line for line in lines if ": schema: " in line]
    assert lines[-1] == f"{path}: {count} problems, 0 of them found by the schema check"


def test_own_document_passes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, witsml_xsd_dir: Path
) -> None:
    path = own_document(tmp_path)
    code, lines, err = validate(capsys, path, "--xsd-dir", witsml_xsd_dir)
    assert code == 0
    assert lines == [f"{path}: no problems found against the schema and the server rules"]
    assert err == ""


def test_schema_folder_from_environment(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    witsml_xsd_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(XSD_DIR_VARIABLE, str(witsml_xsd_dir))
    path = own_document(tmp_path)
    code, lines, _ = validate(capsys, path)
    assert code == 0
    assert lines == [f"{path}: no problems found against the schema and the server rules"]


def test_without_schema_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = own_document(tmp_path)
    code, lines, _ = validate(capsys, path)
    assert code == 0
    assert lines == [
        f"{path}: no problems found against the server rules",
        f"{path}: the XML schema was not checked; to check it, pass --xsd-dir DIR or set "
        "$RIG_AGENT_WITSML_XSD_DIR to the folder that contains obj_log.xsd",
    ]


def test_schema_invalid_document(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, witsml_xsd_dir: Path
) -> None:
    document = build_document(HEADER, CURVES, ROWS)
    broken = document.replace(b"<indexType>date time<", b"<indexType>datetime<").replace(
        b"1523.6,120.0", b"1523.6"
    )
    path = own_document(tmp_path, broken)
    code, lines, _ = validate(capsys, path, "--xsd-dir", witsml_xsd_dir)
    assert code == 1
    assert lines[0].startswith(
        f"{path}:7: schema: Element 'indexType': [facet 'enumeration'] The value 'datetime'"
    )
    assert lines[1] == f"{path}:32: data row has 2 values but mnemonicList names 3 columns"
    assert lines[2] == f"{path}: 2 problems, 1 of them found by the schema check"
    assert len(lines) == 3


def test_problems_sorted_by_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, witsml_xsd_dir: Path
) -> None:
    document = build_document(HEADER, CURVES, ROWS)
    broken = (
        document.replace(b"1523.6,120.0", b"1523.6")
        .replace(b"<unitList>s,psi,", b"<unitList>s,kPa,")
        .replace(b"<nameWell>Example 1H", b"<nameWell>" + b"N" * 70)
        .replace(b' version="1.4.1.1"', b"")
    )
    path = own_document(tmp_path, broken)
    code, lines, _ = validate(capsys, path, "--xsd-dir", witsml_xsd_dir)
    assert code == 1
    numbers = [int(line.split(":")[1]) for line in lines[:-1]]
    assert numbers == sorted(numbers)
    assert len(numbers) >= 4


def test_bom_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, witsml_xsd_dir: Path) -> None:
    path = own_document(tmp_path, b"\xef\xbb\xbf" + build_document(HEADER, CURVES, ROWS))
    code, lines, _ = validate(capsys, path, "--xsd-dir", witsml_xsd_dir)
    assert code == 0
    assert lines == [f"{path}: no problems found against the schema and the server rules"]


def test_not_xml(capsys: pytest.CaptureFixture[str], tmp_path: Path, witsml_xsd_dir: Path) -> None:
    path = tmp_path / "readings.csv"
    path.write_text("time,value\n2024-05-01T06:00:00Z,1.5\n")
    code, lines, _ = validate(capsys, path, "--xsd-dir", witsml_xsd_dir)
    assert code == 1
    assert lines == [
        f"{path}:1: the file is not well-formed XML: Start tag expected, '<' not found, "
        "line 1, column 1",
        f"{path}: 1 problem, 0 of them found by the schema check",
    ]


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "missing.xml"
    code, lines, err = validate(capsys, path)
    assert code == 2
    assert lines == []
    assert err == f"rig-agent witsml validate: cannot read {path}: No such file or directory\n"


def test_missing_schema_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = own_document(tmp_path)
    folder = tmp_path / "xsd"
    code, lines, err = validate(capsys, path, "--xsd-dir", folder)
    assert code == 2
    assert lines == []
    assert err == (
        f"rig-agent witsml validate: the schema folder {folder} (--xsd-dir) has no "
        "obj_log.xsd: give the folder of the WITSML 1.4.1.1 data schemas\n"
    )


def test_schema_variable_missing_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "nowhere"
    monkeypatch.setenv(XSD_DIR_VARIABLE, str(folder))
    code, _, err = validate(capsys, own_document(tmp_path))
    assert code == 2
    assert f"the schema folder {folder} ($RIG_AGENT_WITSML_XSD_DIR) has no obj_log.xsd" in err


def test_unloadable_schema(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "xsd"
    folder.mkdir()
    (folder / "obj_log.xsd").write_text("<not a schema")
    code, _, err = validate(capsys, own_document(tmp_path), "--xsd-dir", folder)
    assert code == 2
    assert f"cannot load the schema {folder / 'obj_log.xsd'}" in err


def test_missing_action(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["witsml"]) == 1
    assert "missing ACTION: use `rig-agent witsml validate FILE`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: FILE"),
        (["log.xml", "--xsd-dir"], "argument --xsd-dir: expected one argument"),
    ],
    ids=["no_file", "xsd_dir_without_value"],
)
def test_usage_error_exit_code(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """argparse exits by itself on a usage error, with exit code 1 for this command."""
    with pytest.raises(SystemExit) as raised:
        main(["witsml", "validate", *args])
    assert raised.value.code == 1
    assert message in capsys.readouterr().err


def test_command_line_process(tmp_path: Path) -> None:
    path = own_document(tmp_path, build_document(HEADER, CURVES, ROWS).replace(b"s,psi,", b"s,"))
    env = {k: v for k, v in os.environ.items() if k != XSD_DIR_VARIABLE}
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "witsml", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 1
    assert f"{path}:30: unitList has 2 entries but mnemonicList has 3" in result.stdout


def test_doctype_rejected(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, witsml_xsd_dir: Path
) -> None:
    """A DOCTYPE with an entity is one problem, not a crash of the schema check."""
    document = build_document(HEADER, CURVES, ROWS)
    declaration, body = document.split(b"\n", 1)
    data = declaration + b'\n<!DOCTYPE logs [<!ENTITY v "212.5">]>\n' + body
    path = own_document(tmp_path, data)

    code, lines, err = validate(capsys, path, "--xsd-dir", witsml_xsd_dir)

    assert code == 1
    assert "Traceback" not in err
    assert lines[0].startswith(f"{path}:1: the document has a DOCTYPE declaration")
    assert lines[-1] == f"{path}: 1 problem, 0 of them found by the schema check"


def test_unlisted_row_problems_counted(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The summary counts every bad row, also those beyond the listed ones."""
    document = build_document(HEADER, CURVES, ROWS).decode()
    first_row = document.index("<data>")
    row_end = document.index("</data>", first_row) + len("</data>")
    bad_rows = "".join(
        f"<data>2024-05-01T07:{i // 60:02d}:{i % 60:02d}Z,1,2,3,4,5,6,7</data>" for i in range(250)
    )
    path = own_document(tmp_path, (document[:first_row] + bad_rows + document[row_end:]).encode())

    code, lines, _ = validate(capsys, path)

    assert code == 1
    assert f"{path}: 250 problems (150 data row problems not listed)" in lines
