"""Identifying values from the DICOM files pydicom ships, and a byte-level search for them."""
from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate",
               "ContentDate", "InstitutionName", "AccessionNumber", "DeviceSerialNumber", "StationName",
               "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "OperatorsName", "ReferringPhysicianName")


def shipped(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def phi_values(*names: str) -> set[str]:
    """Identifying header values of the shipped files, as they appear in their headers."""
    values: set[str] = set()
    for name in names:
        ds = pydicom.dcmread(shipped(name), force=True)
        for kw in IDENTIFYING:
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 4:  # shorter values ("1", "M") occur by chance in any binary file
                values.add(v)
                values.update(p for p in v.split("^") if len(p) >= 4)
    return values


def leaks(files: list[Path], secrets: set[str], root: Path, binary_min_len: int = 0) -> list[tuple[str, str]]:
    """(file, value) for every secret found in a file's name or bytes. In files that are not
    UTF-8 text (weights, images, databases), values shorter than `binary_min_len` are skipped:
    over hundreds of megabytes of weights a 4-byte string turns up by chance."""
    found = []
    for path in files:
        blob = path.read_bytes()
        try:
            blob.decode("utf-8")
            shortest = 0
        except UnicodeDecodeError:
            shortest = binary_min_len
        rel = str(path.relative_to(root))
        for s in secrets:
            if s in rel or (len(s) >= shortest and s.encode() in blob):
                found.append((rel, s))
    return found
