"""The standard WITS record 01 items (General Time-Based): mnemonics, descriptions and units."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "STANDARD_01",
    "StandardItem",
    "describe_code",
    "standard_item",
]


@dataclass(frozen=True, slots=True)
class StandardItem:
    """One item of the WITS data dictionary: its code, short mnemonic and units."""

    code: str
    mnemonic: str
    description: str
    metric_unit: str
    """Unit in the metric unit set; "" for a count, a code or a date."""
    fps_unit: str
    """Unit in the FPS (foot, pound, second) unit set; "" where none applies."""


# (code, mnemonic, description, metric unit, FPS unit). The header items 01-07
# are the same in every record. 0101 is text (up to 16 characters) and 0105
# and 0106 are integers written YYMMDD and HHMMSS; the rest are numbers.
_RECORD_01: tuple[tuple[str, str, str, str, str], ...] = (
    ("0101", "WID", "Well identifier (text)", "", ""),
    ("0102", "SKNO", "Sidetrack or hole section number", "", ""),
    ("0103", "RID", "Record identifier", "", ""),
    ("0104", "SQID", "Sequence identifier", "", ""),
    ("0105", "DATE", "Date, YYMMDD", "", ""),
    ("0106", "TIME", "Time, HHMMSS", "", ""),
    ("0107", "ACTC", "Activity code", "", ""),
    ("0108", "DBTM", "Bit depth (measured)", "m", "ft"),
    ("0109", "DBTV", "Bit depth (vertical)", "m", "ft"),
    ("0110", "DMEA", "Hole depth (measured)", "m", "ft"),
    ("0111", "DVER", "Hole depth (vertical)", "m", "ft"),
    ("0112", "BPOS", "Block position", "m", "ft"),
    ("0113", "ROPA", "Rate of penetration (average)", "m/h", "ft/h"),
    ("0114", "HKLA", "Hookload (average)", "kdaN", "klb"),
    ("0115", "HKLX", "Hookload (maximum)", "kdaN", "klb"),
    ("0116", "WOBA", "Weight on bit, surface (average)", "kdaN", "klb"),
    ("0117", "WOBX", "Weight on bit, surface (maximum)", "kdaN", "klb"),
    ("0118", "TQA", "Rotary torque, surface (average)", "kN.m", "kft.lbf"),
    ("0119", "TQX", "Rotary torque, surface (maximum)", "kN.m", "kft.lbf"),
    ("0120", "RPMA", "Rotary speed, surface (average)", "rpm", "rpm"),
    ("0121", "SPPA", "Standpipe pressure (average)", "kPa", "psi"),
    ("0122", "CHKP", "Casing (choke) pressure", "kPa", "psi"),
    ("0123", "SPM1", "Pump stroke rate #1", "spm", "spm"),
    ("0124", "SPM2", "Pump stroke rate #2", "spm", "spm"),
    ("0125", "SPM3", "Pump stroke rate #3", "spm", "spm"),
    ("0126", "TVA", "Active tank volume", "m3", "bbl"),
    ("0127", "TVCA", "Active tank volume change", "m3", "bbl"),
    ("0128", "MFOP", "Mud flow out (percent)", "%", "%"),
    ("0129", "MFOA", "Mud flow out (average)", "L/min", "gal/min"),
    ("0130", "MFIA", "Mud flow in (average)", "L/min", "gal/min"),
    ("0131", "MDOA", "Mud density out (average)", "kg/m3", "ppg"),
    ("0132", "MDIA", "Mud density in (average)", "kg/m3", "ppg"),
    ("0133", "MTOA", "Mud temperature out (average)", "degC", "degF"),
    ("0134", "MTIA", "Mud temperature in (average)", "degC", "degF"),
    ("0135", "MCOA", "Mud conductivity out (average)", "mmho", "mmho"),
    ("0136", "MCIA", "Mud conductivity in (average)", "mmho", "mmho"),
    ("0137", "STKC", "Pump stroke count (cumulative)", "", ""),
    ("0138", "LSTK", "Lag strokes", "", ""),
    ("0139", "DRTM", "Depth returns (measured)", "m", "ft"),
    ("0140", "GASA", "Gas (average)", "%", "%"),
    ("0141", "SPR1", "Spare 1 (vendor use)", "", ""),
    ("0142", "SPR2", "Spare 2 (vendor use)", "", ""),
    ("0143", "SPR3", "Spare 3 (vendor use)", "", ""),
    ("0144", "SPR4", "Spare 4 (vendor use)", "", ""),
    ("0145", "SPR5", "Spare 5 (vendor use)", "", ""),
)

STANDARD_01: dict[str, StandardItem] = {row[0]: StandardItem(*row) for row in _RECORD_01}
"""Record 01 items 0101 to 0145 by code."""


def standard_item(code: str) -> StandardItem | None:
    """Return the standard record 01 item with this code, or None for any other code."""
    return STANDARD_01.get(code)


def describe_code(code: str) -> str:
    """Return the standard mnemonic of a code, such as "DBTM" for 0108, or "" if it has none."""
    item = STANDARD_01.get(code)
    return item.mnemonic if item is not None else ""
