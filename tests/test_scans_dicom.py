"""DICOM readers on the real files pydicom ships: series (CT_small), SEG (liver_1frame.dcm),
RT-STRUCT (built with pydicom's Dataset API on CT_small slices), de-identification and PHI
absence in every output byte and log line, and bad inputs (truncated file, unknown label)."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from medrega.config import ValidateConfig
from medrega.sources import deid
from medrega.sources.dicom import load_series, read_dataset
from medrega.sources.dicom_seg import read_seg, seg_slices
from medrega.sources.layout import write_slices
from medrega.sources.rtstruct import fill_polygon, rtstruct_slices
from medrega.sources.samed2d import iter_samples, mask_boxes
from medrega.sources.slices import ScanError
from tasks.validate import validate
from tests.phi import leaks, phi_values, shipped

VALIDATE = ValidateConfig(max_failure_share=0.0, max_image_pixels=40_000_000, min_mask_pixels=4)


def ct_series(tmp: Path, n: int = 3, size: int | None = None, uids=None, positions=None) -> list[Path]:
    """`n` slices of one series from CT_small (real header, real pixels), 5 mm apart."""
    src = pydicom.dcmread(shipped("CT_small.dcm"))
    series_uid = generate_uid(entropy_srcs=["series", str(n), str(size)])
    paths = []
    for i in range(n):
        ds = copy.deepcopy(src)
        if size:
            arr = np.kron(src.pixel_array, np.ones((size // src.Rows,) * 2, src.pixel_array.dtype))
            ds.PixelData = arr.tobytes()
            ds.Rows = ds.Columns = size
            ds.PixelSpacing = [float(v) * src.Rows / size for v in src.PixelSpacing]
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = uids[i] if uids else generate_uid(entropy_srcs=["sop", str(i), str(size)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n - i  # deliberately reversed: the reader must sort by position
        pos = positions[i] if positions else [float(v) for v in src.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + (0 if positions else 5.0 * i)]
        p = tmp / f"slice{i}.dcm"
        ds.save_as(p)
        paths.append(p)
    return paths[::-1]  # unsorted on input


# ---- de-identification -------------------------------------------------------------------------

def test_deidentify_removes_profile_attributes_and_dates():
    ds = pydicom.dcmread(shipped("liver_1frame.dcm"))
    name, pid, study_uid = str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)
    out, pseud = deid.deidentify(ds, key="k1")
    assert pseud == deid.pseudonym(pid, "k1") and pseud.startswith("p")
    assert str(out.PatientName) == pseud and out.PatientID == pseud
    for kw in ("StudyDate", "SeriesDate", "ContentDate", "StudyTime", "AccessionNumber",
               "DeviceSerialNumber", "PatientSex", "PatientAge", "ClinicalTrialCoordinatingCenterName"):
        assert kw not in out, kw
    dump = str(out)
    assert name not in dump and pid not in dump and study_uid not in dump
    for elem in out.iterall():  # no date/time/person survives anywhere, sequences included
        assert elem.VR not in ("DA", "DT", "TM") and (elem.VR != "PN" or str(elem.value) == pseud)
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # standard UIDs are kept


def test_uid_remap_is_consistent_and_keyed():
    a = pydicom.dcmread(shipped("liver_1frame.dcm"))
    b = pydicom.dcmread(shipped("liver_1frame.dcm"))
    ref = str(a.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
    deid.deidentify(a, key="k1")
    deid.deidentify(b, key="k1")
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    new_ref = a.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert new_ref == deid.remap_uid(ref, "k1") != ref  # references follow their targets
    assert new_ref.startswith("2.25.") and len(new_ref) <= 64
    assert deid.remap_uid(ref, "k2") != new_ref and deid.pseudonym("x", "k1") != deid.pseudonym("x", "k2")


# ---- series -----------------------------------------------------------------------------------

def test_series_sorted_by_position_and_rescaled(tmp_path):
    paths = ct_series(tmp_path)
    s = load_series(paths, key="k")
    z = s.origins[:, 2]
    assert list(z) == sorted(z) and len(set(z)) == 3
    raw = pydicom.dcmread(shipped("CT_small.dcm"))
    assert s.values.shape == (3, 128, 128)
    np.testing.assert_allclose(s.values[0], raw.pixel_array * 1.0 - 1024.0)  # slope 1, intercept -1024
    assert s.modality == "ct" and s.patient == deid.pseudonym("1CT1", "k")


def test_truncated_dicom_names_file_and_rule_and_writes_nothing(tmp_path):
    bad = shipped("MR_truncated.dcm")
    out = tmp_path / "root"
    with pytest.raises(ScanError) as err:
        write_slices(out, load_series([bad]).values)  # reading fails before any write
    assert str(bad) in str(err.value) and "pixel data decodes" in str(err.value)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(shipped("CT_small.dcm").read_bytes()[:300])
    with pytest.raises(ScanError, match=r"cut\.dcm: rule '(file reads as DICOM|file holds pixel data|pixel data decodes)'"):
        read_dataset(cut)
    assert not out.exists()  # nothing half-written


def test_ultrasound_with_burned_in_text_is_refused():
    with pytest.raises(ScanError, match="no burned-in annotation"):
        load_series([shipped("examples_rgb_color.dcm")])


# ---- DICOM SEG --------------------------------------------------------------------------------

def test_seg_segment_labels_map_to_vocabulary():
    frames, pid = read_seg(shipped("liver_1frame.dcm"), key="k")
    assert len(frames) == 1 and frames[0].key == "liver"
    assert frames[0].mask.shape == (512, 512) and frames[0].mask.sum() > 1000
    assert pid == deid.pseudonym("99000", "k")


def test_seg_unknown_label_names_file_and_rule(tmp_path):
    ds = pydicom.dcmread(shipped("liver_1frame.dcm"))
    ds.SegmentSequence[0].SegmentLabel = "Unicorn gland"
    bad = tmp_path / "unicorn_seg.dcm"
    ds.save_as(bad)
    with pytest.raises(ScanError, match=r"unicorn_seg\.dcm: rule 'segment label maps to the vocabulary'.*Unicorn gland"):
        read_seg(bad)
    # A site-specific name is accepted once mapped explicitly.
    frames, _ = read_seg(bad, labels={"Unicorn gland": "liver"})
    assert frames[0].key == "liver"


def test_seg_on_its_source_series_writes_valid_layout(tmp_path):
    seg = pydicom.dcmread(shipped("liver_1frame.dcm"))
    # The SEG's referenced CT slices are not shipped: rebuild them (CT_small pixels upsampled to
    # the SEG's 512x512 grid) under the exact SOP Instance UIDs and positions the SEG points at.
    fgs = seg.PerFrameFunctionalGroupsSequence
    uids = [str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID) for f in fgs]
    pos = [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in fgs]
    pos = [[p[0], p[1], p[2] + i] for i, p in enumerate(pos)]  # 3 distinct planes, frame 0 first
    paths = ct_series(tmp_path, n=3, size=512, uids=uids, positions=pos)
    for p in paths:  # the SEG and its source must be the same (pseudonymous) patient
        ds = pydicom.dcmread(p)
        ds.PatientID = "99000"
        ds.save_as(p)
    series = load_series(paths, key="k")
    slices = seg_slices(shipped("liver_1frame.dcm"), series, dataset="LiverSEG", policy="labelled", key="k")
    assert len(slices) == 1 and slices[0].masks[0][0] == "liver"
    root = tmp_path / "root"
    write_slices(root, slices)
    (sample,) = list(iter_samples(root))
    assert sample.regions[0].label == "liver" and sample.patient == series.patient
    assert mask_boxes(sample.regions[0].mask)
    assert validate(root, tmp_path / "val", VALIDATE)["passed"]


# ---- RT-STRUCT --------------------------------------------------------------------------------

def test_fill_polygon_even_odd():
    square = fill_polygon(10, 10, np.array([2, 2, 6, 6]), np.array([2, 6, 6, 2]))
    assert square.sum() == 25 and square[2:7, 2:7].all()
    assert not fill_polygon(10, 10, np.array([1, 1]), np.array([1, 5])).any()  # degenerate


def build_rtstruct(series_paths: list[Path], roi_name: str, out: Path) -> Path:
    """An RT Structure Set made with pydicom's Dataset API: one 'Liver' square on the middle
    slice (plus an EXTERNAL outline that must be skipped), referencing the slice's instance."""
    ref = [pydicom.dcmread(p) for p in series_paths]
    ref.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    mid = ref[1]
    ox, oy, oz = (float(v) for v in mid.ImagePositionPatient)
    dx = float(mid.PixelSpacing[1])
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["rt"])
    ds.Modality = "RTSTRUCT"
    ds.PatientName, ds.PatientID, ds.StudyDate = mid.PatientName, mid.PatientID, "20040119"
    ds.StructureSetDate = "20040120"
    ds.InstitutionName = "Saint Example Hospital"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = mid.StudyInstanceUID, generate_uid(entropy_srcs=["rts"])

    def roi(number, name, kind):
        item = Dataset()
        item.ROINumber, item.ROIName = number, name
        obs = Dataset()
        obs.ReferencedROINumber, obs.RTROIInterpretedType, obs.ObservationNumber = number, kind, number
        return item, obs

    (r1, o1), (r2, o2) = roi(1, roi_name, "ORGAN"), roi(2, "BODY", "EXTERNAL")
    ds.StructureSetROISequence = Sequence([r1, r2])
    ds.RTROIObservationsSequence = Sequence([o1, o2])
    contours = []
    for number, (x0, x1) in ((1, (20, 60)), (2, (0, 120))):
        c = Dataset()
        c.ContourGeometricType = "CLOSED_PLANAR"
        pts = [(x0, x0), (x1, x0), (x1, x1), (x0, x1)]  # square in pixel units on the middle slice
        c.ContourData = [v for (px, py) in pts for v in (ox + px * dx, oy + py * dx, oz)]
        c.NumberOfContourPoints = len(pts)
        img = Dataset()
        img.ReferencedSOPClassUID, img.ReferencedSOPInstanceUID = mid.SOPClassUID, mid.SOPInstanceUID
        c.ContourImageSequence = Sequence([img])
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = Sequence([c])
        contours.append(rc)
    ds.ROIContourSequence = Sequence(contours)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_rtstruct_contours_rasterised_on_referenced_slice(tmp_path):
    paths = ct_series(tmp_path)
    rt = build_rtstruct(paths, "Liver", tmp_path / "rt.dcm")
    series = load_series(paths, key="k")
    slices = rtstruct_slices(rt, series, dataset="RTLiver", policy="labelled", key="k")
    assert [s.index for s in slices] == [1]  # only the middle slice holds the contour
    (key, mask), = slices[0].masks  # the EXTERNAL body outline is skipped
    assert key == "liver"
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20, 60, 20, 60)


def test_rtstruct_unknown_roi_name_names_file_and_rule(tmp_path):
    paths = ct_series(tmp_path)
    rt = build_rtstruct(paths, "GTV_boost_2", tmp_path / "rt_bad.dcm")
    with pytest.raises(ScanError, match=r"rt_bad\.dcm: rule 'ROI name maps to the vocabulary'.*GTV_boost_2"):
        rtstruct_slices(rt, load_series(paths), dataset="RT")


# ---- PHI absence ------------------------------------------------------------------------------

def test_no_phi_in_any_output_byte_or_log(tmp_path, caplog):
    """Run the readers on shipped files whose headers hold patient names, IDs, dates and UIDs;
    then no header value may appear in any written file (names or bytes) or in captured logs."""
    caplog.set_level(logging.DEBUG)
    (tmp_path / "in").mkdir()
    paths = ct_series(tmp_path / "in", n=3)
    rt = build_rtstruct(paths, "Liver", tmp_path / "in" / "rt.dcm")
    root = tmp_path / "out"
    series = load_series(paths)
    write_slices(root, rtstruct_slices(rt, series, dataset="RTLiver", policy="labelled"))
    from medrega.sources.embedded import add_package_scans
    add_package_scans(root)
    secrets = phi_values("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "liver_1frame.dcm")
    secrets |= {"Saint Example Hospital", "20040119", "20040120"}
    assert {"CompressedSamples", "CQ500-CT-310", "JXD191021006", "1CT1"} <= secrets
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) >= 8
    assert leaks(files, secrets, root) == []
    log_text = caplog.text + " ".join(str(r.args) for r in caplog.records)
    for s in secrets:
        assert s not in log_text, s
