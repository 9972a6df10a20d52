"""De-identification: no PHI survives (sequences, private tags, raw bytes), valid DICOM out, stable keyed UIDs,
per-patient date shifts, burned-in quarantine, the audit and the command line."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from medlens.errors import InputError  # noqa: E402
from medlens.io import deid_profile as profile  # noqa: E402
from medlens.io.deid import Deidentifier, DeidOptions, deidentify, read_audit, scrub_text  # noqa: E402

PREAMBLE_PHI = b"Doe^John 19700101"
PREAMBLE_PHI_LEN = len(PREAMBLE_PHI)
ALL_OPTIONS = DeidOptions(
    retain_modified_dates=True,
    retain_device_identity=True,
    retain_institution_identity=True,
    retain_patient_characteristics=True,
    clean_descriptors=True,
)


# ---- helpers -------------------------------------------------------------------------------------------------
def walk(ds: Dataset) -> Iterator[pydicom.DataElement]:
    """Every element of ``ds``, sequence items included (depth first)."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from walk(item)


def strings(elem: pydicom.DataElement) -> list[str]:
    if elem.VR in ("SQ", "OB", "OW", "UN", "OF", "OD", "OL") or elem.value is None:
        return []
    values = elem.value if elem.VM > 1 else [elem.value]
    return [str(v).strip() for v in values if str(v).strip()]


def phi_values(ds: Dataset, options: DeidOptions) -> set[str]:
    """Values of attributes the profile does not keep (private, listed and not retained, dates), minus values
    that also occur in attributes that are legitimately kept (e.g. '5.000000' in a private tag and in
    SliceThickness, Institution 'TOSHIBA' inside Manufacturer 'TOSHIBA_MEC'), and minus very short ones (a 1-3
    character value is not recognisable)."""
    phi, kept = set(), set()
    opts = options.profile_options()

    def visit(d: Dataset, phi_context: bool) -> None:
        for elem in d:
            rule = profile.rule_for(elem.tag, opts)
            is_phi = phi_context or elem.tag.is_private or (rule is not None and rule[1] not in ("K", "C"))
            is_phi = is_phi or (elem.VR in ("DA", "DT") and not options.retain_full_dates)
            is_phi = is_phi or (0x6000 <= elem.tag.group <= 0x60FF)
            if rule is not None and rule[1] == "C" and elem.VR in ("DA", "DT"):
                is_phi = True  # shifted dates must not keep their original value
            (phi if is_phi else kept).update(strings(elem))
            if elem.VR == "SQ":
                for item in elem.value or []:
                    visit(item, (is_phi and (rule is None or rule[1] in ("X", "Z"))) or elem.tag.is_private)

    visit(ds, False)
    return {v for v in phi - kept if len(v) >= 4 and not any(v in k for k in kept)}


def assert_no_phi(src_file: Path, out_file: Path, options: DeidOptions) -> int:
    ds_in = pydicom.dcmread(src_file)
    phi = phi_values(ds_in, options)
    for name in ("PatientName", "PatientID"):
        if len(str(ds_in.get(name, ""))) >= 4:
            phi.add(str(ds_in.get(name)))
    out = pydicom.dcmread(out_file)
    out_strings = [s for e in walk(out) for s in strings(e)] + [s for e in out.file_meta for s in strings(e)]
    raw = out_file.read_bytes()
    for value in phi:
        if len(value) < 8 and not re.search(r"[A-Za-z]", value):  # a short number (a private SL '1576'...)
            assert value not in out_strings, f"{src_file.name}: {value!r} survived"  # may be inside a new UID
            continue
        assert not any(value in s for s in out_strings), f"{src_file.name}: {value!r} survived in a value"
        assert value.encode("utf-8", "replace") not in raw, (
            f"{src_file.name}: {value!r} survived in the bytes"
        )
    assert not any(e.tag.is_private for e in walk(out))
    assert out.PatientIdentityRemoved == "YES"
    return len(phi)


def planted_phi_file(path: Path, pydicom_file: Callable[[str], Path]) -> Path:
    """CT_small with PHI planted in nested sequences, private tags (and a private sequence) and free text."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.PatientName = "Doe^Johnathan"
    ds.PatientID = "PHI-ID-98765"
    ds.PatientBirthDate = "19610412"
    ds.PatientAddress = "12 Harley Street London"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.OtherPatientNames = "Johnny^Doebrother"
    ds.ImageComments = "Patient Johnathan Doe seen 2019-03-04, MRN 5551234"
    ds.StudyDescription = "CT chest for Johnathan Doe"
    block = ds.private_block(0x0099, "ACME PHI", create=True)
    block.add_new(0x01, "LO", "Johnathan private copy")
    inner = Dataset()
    inner.PatientName = "Privseq^Hiddenname"
    block.add_new(0x02, "SQ", Sequence([inner]))
    request = Dataset()
    request.RequestedProcedureID = "REQ-PROC-4242"
    request.ScheduledProcedureStepID = "SPS-77777"
    ds.RequestAttributesSequence = Sequence([request])
    deep = Dataset()
    deep.CodeValue, deep.CodingSchemeDesignator, deep.CodeMeaning = "R-1", "99LOCAL", "reason"
    deep.PersonName = "Deepnested^Person"
    deep.InstitutionName = "Saint Elsewhere Hospital"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "P-1", "99LOCAL", "CT chest"
    code.OperatorsName = "Nurse^Ratchedname"
    code.PurposeOfReferenceCodeSequence = Sequence([deep])
    code.ReferencedImageSequence = Sequence([])
    ds.ProcedureCodeSequence = Sequence([code])
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.3.4.5.6.7.8.9.123456789"
    series = Dataset()
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    series.ReferencedInstanceSequence = Sequence([ref])
    ds.ReferencedSeriesSequence = Sequence([series])
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> set[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stderr + out.stdout).splitlines()
    # UIDs are replaced by design: compare the kinds of errors, not the UIDs quoted in them
    return {
        re.sub(r"\d+(\.\d+)+", "<UID>", " ".join(line.split())) for line in lines if line.startswith("Error")
    }


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


# ---- 1. no PHI survives --------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [DeidOptions(), ALL_OPTIONS], ids=["basic", "options"])
def test_no_phi_survives_in_real_and_planted_files(
    tmp_path: Path, pydicom_file: Callable[[str], Path], options: DeidOptions
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "examples_ybr_color.dcm"):
        shutil.copy(pydicom_file(name), src / name)
    raw_ct = bytearray((src / "CT_small.dcm").read_bytes())  # PHI in the 128-byte Part 10 preamble
    raw_ct[:PREAMBLE_PHI_LEN] = PREAMBLE_PHI
    (src / "CT_small.dcm").write_bytes(bytes(raw_ct))
    shutil.copytree(pydicom_file("CT_small.dcm").parent / "dicomdirtests" / "98892003", src / "dicomdir")
    shutil.copy(
        pydicom_file("CT_small.dcm").parent / "dicomdirtests" / "DICOMDIR", src / "dicomdir" / "DICOMDIR"
    )
    planted_phi_file(src / "planted.dcm", pydicom_file)
    before = tree_hash(src)
    (tmp_path / "key").write_text("5e" * 32)  # a fixed key: the run (UIDs, date offsets) is reproducible
    opts = DeidOptions(**{**options.__dict__, "allow_burned_in": True})  # the US file too
    result = deidentify(src, tmp_path / "out", key_file=tmp_path / "key", options=opts)

    assert tree_hash(src) == before  # the input is never modified
    dicom_files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    assert sorted(result.written) == [p.relative_to(src) for p in dicom_files]  # same folder structure
    assert [str(p) for p, _ in result.skipped] == [str(Path("dicomdir") / "DICOMDIR")]
    checked = sum(assert_no_phi(p, tmp_path / "out" / p.relative_to(src), opts) for p in dicom_files)
    assert checked > 100  # the check looked at many values, not at none

    planted = pydicom.dcmread(tmp_path / "out" / "planted.dcm")
    raw = (tmp_path / "out" / "planted.dcm").read_bytes()
    for word in (b"Johnathan", b"5551234", b"Hiddenname", b"Deepnested", b"Ratched", b"Harley"):
        assert word not in raw
    assert (b"Elsewhere" in raw) == opts.retain_institution_identity  # kept only when asked, even when nested
    code = planted.ProcedureCodeSequence[0]  # a sequence outside the table is kept, its PHI cleaned inside
    assert code.CodeMeaning == "CT chest" and "OperatorsName" not in code
    assert code.PurposeOfReferenceCodeSequence[0].PersonName != "Deepnested^Person"
    if (
        opts.clean_descriptors
    ):  # Request Attributes Sequence is a descriptor (C): kept, its identifiers removed
        assert planted.RequestAttributesSequence[0].get("RequestedProcedureID") in (None, "ANONYMIZED")
    else:
        assert "RequestAttributesSequence" not in planted
    if opts.clean_descriptors:  # descriptors are kept but scrubbed
        assert planted.StudyDescription == "CT chest for * *"
        assert planted.ImageComments == "Patient * * seen *, MRN *"
    else:
        assert "StudyDescription" not in planted and "ImageComments" not in planted
    for rel in result.written:  # the preamble is zeroed in every output, the planted PHI is gone
        raw = (tmp_path / "out" / rel).read_bytes()
        assert raw[:132] == b"\0" * 128 + b"DICM", rel
    raw_ct_out = (tmp_path / "out" / "CT_small.dcm").read_bytes()
    assert b"Doe^John" not in raw_ct_out and b"19700101" not in raw_ct_out
    overlay = pydicom.dcmread(tmp_path / "out" / "examples_overlay.dcm")
    assert not [e for e in overlay if 0x6000 <= e.tag.group <= 0x60FF]  # the whole overlay group is gone


def test_private_sequences_and_unreadable_files_are_handled(
    tmp_path: Path, pydicom_file: Callable[[str], Path]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(pydicom_file("nested_priv_SQ.dcm"), src / "nested.dcm")  # a bare dataset, no SOP Class
    (src / "notes.txt").write_text("Johnathan Doe 1961-04-12")
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    block = ds.private_block(0x0041, "ACME NESTED", create=True)
    inner = Dataset()
    inner.add_new(0x00410010, "LO", "ACME INNER")
    inner.add_new(0x00411001, "LO", "Privatenested^Patientname")
    block.add_new(0x01, "SQ", Sequence([inner]))
    ds.save_as(src / "mr.dcm", enforce_file_format=True)
    result = deidentify(src, tmp_path / "out", key_file=tmp_path / "key")
    assert [str(p) for p in result.written] == ["mr.dcm"]
    out = tmp_path / "out" / "mr.dcm"
    assert not any(e.tag.is_private for e in walk(pydicom.dcmread(out)))
    assert b"Privatenested" not in out.read_bytes() and b"ACME" not in out.read_bytes()
    skipped = {str(p): why for p, why in result.skipped}
    assert "notes.txt" in skipped and "DICOM" in skipped["notes.txt"]
    assert "nested.dcm" in skipped and "SOP Class UID" in skipped["nested.dcm"]
    assert not (tmp_path / "out" / "notes.txt").exists()
    audit = read_audit(result.audit_path)
    assert any(r["file"] == "notes.txt" and r["action"] == "skipped" for r in audit)


# ---- 2. valid DICOM: dciodvfy reports no new errors -----------------------------------------------------------
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
@pytest.mark.parametrize("options", [DeidOptions(), ALL_OPTIONS], ids=["basic", "options"])
def test_dciodvfy_reports_no_new_errors(
    tmp_path: Path, pydicom_file: Callable[[str], Path], options: DeidOptions
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    names: tuple[str, ...] = ("CT_small.dcm", "MR_small.dcm")
    if (
        not options.profile_options()
    ):  # the basic profile also on an overlay MR, an RT plan, an SR, a headerless file
        names += ("examples_overlay.dcm", "rtplan.dcm", "test-SR.dcm", "rtstruct.dcm")
    for name in names:
        shutil.copy(pydicom_file(name), src / name)
    result = deidentify(src, tmp_path / "out", key_file=tmp_path / "key", options=options)
    assert len(result.written) == len(names)  # rtstruct.dcm has no Part 10 header: read all the same
    for name in names:
        new = dciodvfy_errors(tmp_path / "out" / name) - dciodvfy_errors(src / name)
        assert not new, f"{name}: new dciodvfy errors {new}"


# ---- 3. UIDs: consistent across files and runs, keyed ---------------------------------------------------------
def test_uids_stay_consistent_across_a_study_and_depend_on_the_key(
    tmp_path: Path, ct_series: Callable
) -> None:
    study = "1.2.826.0.1.3680043.8.498.999.1"
    a = ct_series(tmp_path / "in" / "s1", slices=3, study_uid=study, seed=1)
    b = ct_series(tmp_path / "in" / "s2", slices=3, study_uid=study, seed=2)

    def run(key: str, out: str) -> dict[str, Dataset]:
        deidentify(tmp_path / "in", tmp_path / out, key_file=tmp_path / key)
        return {
            str(p.relative_to(tmp_path / out)): pydicom.dcmread(p) for p in (tmp_path / out).rglob("*.dcm")
        }

    first, again, other = run("k1", "o1"), run("k1", "o2"), run("k2", "o3")
    assert len(first) == 6
    assert len({d.StudyInstanceUID for d in first.values()}) == 1  # one study stays one study
    series = {d.SeriesInstanceUID for d in first.values()}
    assert len(series) == 2 and all(s.startswith("2.25.") and len(s) <= 64 for s in series)
    by_series = {rel.split("/")[0]: d.SeriesInstanceUID for rel, d in first.items()}
    assert len(set(by_series.values())) == 2  # distinct series stay distinct, files of one series together
    assert len({d.SOPInstanceUID for d in first.values()}) == 6
    assert {a.series_uid, b.series_uid, study}.isdisjoint({d.SeriesInstanceUID for d in first.values()} | {
        d.StudyInstanceUID for d in first.values()})  # fmt: skip
    for rel, d in first.items():
        assert d.SOPInstanceUID == again[rel].SOPInstanceUID  # same key: same mapping
        assert d.SOPInstanceUID != other[rel].SOPInstanceUID  # other key: other mapping
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert d.PatientID == again[rel].PatientID != other[rel].PatientID  # keyed pseudonym
    assert pydicom.uid.UID(next(iter(series))).is_valid


def test_uid_references_inside_sequences_map_like_the_referenced_instance(
    tmp_path: Path, pydicom_file: Callable[[str], Path]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    planted = planted_phi_file(src / "a.dcm", pydicom_file)
    ds = pydicom.dcmread(planted)
    target = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    target.SOPInstanceUID = (
        ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    )
    target.file_meta.MediaStorageSOPInstanceUID = target.SOPInstanceUID
    target.save_as(src / "b.dcm", enforce_file_format=True)
    deidentify(src, tmp_path / "out", key_file=tmp_path / "key")
    a, b = (pydicom.dcmread(tmp_path / "out" / n) for n in ("a.dcm", "b.dcm"))
    ref = a.ReferencedSeriesSequence[0]
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID
    assert ref.SeriesInstanceUID == a.SeriesInstanceUID == b.SeriesInstanceUID


def test_retain_uids_option_keeps_them(tmp_path: Path, pydicom_file: Callable[[str], Path]) -> None:
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "ct.dcm")
    deidentify(tmp_path / "ct.dcm", tmp_path / "out", key_file=tmp_path / "key",
               options=DeidOptions(retain_uids=True))  # fmt: skip
    ds_in, ds_out = pydicom.dcmread(tmp_path / "ct.dcm"), pydicom.dcmread(tmp_path / "out" / "ct.dcm")
    assert ds_out.SOPInstanceUID == ds_in.SOPInstanceUID and ds_out.StudyInstanceUID == ds_in.StudyInstanceUID
    assert "113110" in {i.CodeValue for i in ds_out.DeidentificationMethodCodeSequence}


# ---- 4. dates shifted per patient, intervals kept -------------------------------------------------------------
def test_dates_shift_by_a_constant_per_patient_offset(
    tmp_path: Path, pydicom_file: Callable[[str], Path]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    dates = {"p1": ("20200110", "20200301", "19991231"), "p2": ("20200110", "20210615", "20000229")}
    for n, (pid, (study, content, acq)) in enumerate(
        [(p, d) for p, d in dates.items() for _ in range(2)]
    ):  # two files per patient
        ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
        ds.PatientID, ds.StudyDate, ds.ContentDate, ds.AcquisitionDate = pid, study, content, acq
        ds.AcquisitionDateTime = acq + "101500.5+0100"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{n}"
        ds.save_as(src / f"{pid}_{n}.dcm", enforce_file_format=True)
    opts = DeidOptions(retain_modified_dates=True)
    deidentify(src, tmp_path / "out", key_file=tmp_path / "key", options=opts)

    def days(a: str, b: str) -> int:
        return (
            date.fromisoformat(f"{b[:4]}-{b[4:6]}-{b[6:8]}")
            - date.fromisoformat(f"{a[:4]}-{a[4:6]}-{a[6:8]}")
        ).days

    offsets = {}
    for path in sorted((tmp_path / "out").glob("*.dcm")):
        pid = path.name.split("_")[0]
        ds = pydicom.dcmread(path)
        original = dates[pid]
        new = (ds.StudyDate, ds.ContentDate, ds.AcquisitionDate)
        shifts = {days(o, str(n)) for o, n in zip(original, new, strict=True)}
        assert len(shifts) == 1  # one offset for all dates of the patient: intervals preserved
        shift = shifts.pop()
        assert -11 * 366 <= shift <= -365
        assert (
            ds.AcquisitionDateTime.endswith("101500.5+0100")
            and days(original[2], ds.AcquisitionDateTime[:8]) == shift
        )
        assert offsets.setdefault(pid, shift) == shift  # same patient, same offset in every file
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "113107" in {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}
        assert "InstanceCreationDate" not in ds or ds.InstanceCreationDate != "20040119"
    assert offsets["p1"] != offsets["p2"]


# ---- 5. burned-in annotation ----------------------------------------------------------------------------------
def test_burned_in_images_are_quarantined_unless_allowed(
    tmp_path: Path, pydicom_file: Callable[[str], Path]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(pydicom_file("examples_ybr_color.dcm"), src / "us.dcm")
    shutil.copy(pydicom_file("SC_rgb_small_odd.dcm"), src / "sc.dcm")
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    ds.save_as(src / "flagged.dcm", enforce_file_format=True)
    shutil.copy(pydicom_file("MR_small.dcm"), src / "mr.dcm")

    result = deidentify(src, tmp_path / "out", key_file=tmp_path / "key")
    assert sorted(str(p) for p, _ in result.quarantined) == ["flagged.dcm", "sc.dcm", "us.dcm"]
    assert [str(p) for p in result.written] == ["mr.dcm"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "deid_audit.csv",
        "mr.dcm",
    ]  # nothing copied
    rows = [r for r in read_audit(result.audit_path) if r["action"] == "quarantined"]
    assert {r["file"] for r in rows} == {"flagged.dcm", "sc.dcm", "us.dcm"}

    allowed = deidentify(
        src, tmp_path / "out2", key_file=tmp_path / "key", options=DeidOptions(allow_burned_in=True)
    )
    assert len(allowed.written) == 4 and not allowed.quarantined
    assert pydicom.dcmread(tmp_path / "out2" / "flagged.dcm").BurnedInAnnotation == "YES"


def encapsulated_pdf(path: Path, phi: bytes) -> Path:
    """An Encapsulated PDF instance whose PDF carries ``phi`` (as a report's header would), header clean."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pdf = (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n"
           b"2 0 obj << /Length 44 >> stream\nBT (Report for " + phi + b") Tj ET\nendstream endobj\n%%EOF\n")  # fmt: skip
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.104.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Clean^Header", "X1", "DOC"
    ds.MIMETypeOfEncapsulatedDocument, ds.DocumentTitle = "application/pdf", "Report"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_encapsulated_documents_are_always_quarantined(
    tmp_path: Path, pydicom_file: Callable[[str], Path]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    phi = b"Doe^Johnathan born 19610412"
    encapsulated_pdf(src / "report.dcm", phi)
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))  # an image carrying a document deep in a sequence
    item = Dataset()
    item.EncapsulatedDocument = b"%PDF-1.4 " + phi + b"\0"
    ds.ProcedureCodeSequence = Sequence([item])
    ds.save_as(src / "ct_with_doc.dcm", enforce_file_format=True)
    shutil.copy(pydicom_file("MR_small.dcm"), src / "mr.dcm")

    for out, opts in (("out", DeidOptions()), ("out2", DeidOptions(allow_burned_in=True))):
        result = deidentify(src, tmp_path / out, key_file=tmp_path / "key", options=opts)
        reasons = {str(p): why for p, why in result.quarantined}
        assert sorted(reasons) == ["ct_with_doc.dcm", "report.dcm"]  # --allow-burned-in does not let them out
        assert "Encapsulated PDF" in reasons["report.dcm"] and "(0042,0011)" in reasons["ct_with_doc.dcm"]
        assert [str(p) for p in result.written] == ["mr.dcm"]
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == ["deid_audit.csv", "mr.dcm"]
        rows = {r["file"]: r for r in read_audit(result.audit_path) if r["action"] == "quarantined"}
        assert set(rows) == set(reasons) and "encapsulated document" in rows["report.dcm"]["rule"]
        for path in (tmp_path / out).iterdir():
            assert b"Johnathan" not in path.read_bytes()


def test_icon_images_and_encrypted_attributes_are_removed_everywhere(
    tmp_path: Path, pydicom_file: Callable[[str], Path]
) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))

    def icon() -> Dataset:  # a thumbnail whose pixels spell a name (burned-in text, as bytes)
        item = Dataset()
        item.Rows, item.Columns, item.SamplesPerPixel, item.PhotometricInterpretation = (
            1,
            14,
            1,
            "MONOCHROME2",
        )
        item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 8, 8, 7, 0
        item.PixelData = b"Iconname^Jane"[:14].ljust(14, b"_")
        return item

    ds.IconImageSequence = Sequence([icon()])
    code = Dataset()  # a sequence outside the table is kept and walked: the nested icon must go too
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "P-1", "99LOCAL", "CT chest"
    code.IconImageSequence = Sequence([icon()])
    ds.ProcedureCodeSequence = Sequence([code])
    encrypted = Dataset()
    encrypted.EncryptedContentTransferSyntaxUID = "1.2.840.10008.1.2.1"
    encrypted.EncryptedContent = b"Cryptname^Original\0\0"
    ds.EncryptedAttributesSequence = Sequence([encrypted])
    ds.save_as(tmp_path / "ct.dcm", enforce_file_format=True)

    result = deidentify(tmp_path / "ct.dcm", tmp_path / "out", key_file=tmp_path / "key")
    out_path = tmp_path / "out" / "ct.dcm"
    raw = out_path.read_bytes()
    assert b"Iconname" not in raw and b"Cryptname" not in raw
    out = pydicom.dcmread(out_path)
    assert not [e for e in walk(out) if e.keyword in ("IconImageSequence", "EncryptedAttributesSequence")]
    assert out.ProcedureCodeSequence[0].CodeMeaning == "CT chest" and out.pixel_array.shape == (128, 128)
    removed = {r["path"]: r["rule"] for r in read_audit(result.audit_path) if r["action"] == "removed"}
    assert (
        "icon" in removed["IconImageSequence"]
        and "icon" in removed["ProcedureCodeSequence[0].IconImageSequence"]
    )
    assert "encrypted" in removed["EncryptedAttributesSequence"]


# ---- audit, options, key, errors -------------------------------------------------------------------------------
def test_audit_records_changes_without_raw_phi(tmp_path: Path, pydicom_file: Callable[[str], Path]) -> None:
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "ct.dcm")
    result = deidentify(tmp_path / "ct.dcm", tmp_path / "out", key_file=tmp_path / "key")
    text = result.audit_path.read_text()
    for phi in ("CompressedSamples", "1CT1", "JFK IMAGING CENTER", "CT01_OC0", "19970430", "GEMS_IDEN_01"):
        assert phi not in text
    rows = read_audit(result.audit_path)
    assert list(rows[0]) == ["file", "path", "tag", "keyword", "action", "rule", "old_hash", "new_value"]
    by_kw = {r["keyword"]: r for r in rows}
    assert (
        by_kw["InstitutionName"]["action"] == "removed"
        and by_kw["InstitutionName"]["rule"] == "X/Z/D -> X (type 3 in the IOD)"
    )
    assert (
        by_kw["ContentDate"]["action"] == "emptied"
        and by_kw["ContentDate"]["rule"] == "Z/D -> Z (type 2C in the IOD)"
    )
    assert by_kw["PatientID"]["new_value"] == pydicom.dcmread(tmp_path / "out" / "ct.dcm").PatientID
    assert by_kw["StudyInstanceUID"]["action"] == "replaced"
    assert sum(r["rule"] == "X (private attribute)" for r in rows) > 100
    # the hash is keyed: the same value under another key hashes differently, so a table of guesses fails
    assert Deidentifier(b"k" * 32).value_hash("1CT1") != Deidentifier(b"j" * 32).value_hash("1CT1")
    assert by_kw["PatientID"]["old_hash"] not in (hashlib.sha256(b"1CT1").hexdigest()[:16], "")


def test_options_keep_what_they_promise(tmp_path: Path, pydicom_file: Callable[[str], Path]) -> None:
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "ct.dcm")
    deidentify(tmp_path / "ct.dcm", tmp_path / "basic", key_file=tmp_path / "key")
    deidentify(tmp_path / "ct.dcm", tmp_path / "opt", key_file=tmp_path / "key", options=ALL_OPTIONS)
    basic, opt = (pydicom.dcmread(tmp_path / d / "ct.dcm") for d in ("basic", "opt"))
    assert "StationName" not in basic and opt.StationName == "CT01_OC0"  # device identity
    assert "InstitutionName" not in basic and opt.InstitutionName == "JFK IMAGING CENTER"  # institution
    assert basic.PatientSex == "" and opt.PatientSex == "O" and opt.PatientAge == "000Y"  # characteristics
    assert "StudyDescription" not in basic and opt.StudyDescription == "e+1"  # clean descriptors keeps it
    codes = {i.CodeValue for i in opt.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113107", "113109", "113112", "113108", "113105"}
    assert {i.CodeValue for i in basic.DeidentificationMethodCodeSequence} == {"113100"}
    assert basic.LongitudinalTemporalInformationModified == "REMOVED"
    with pytest.raises(InputError, match="exclude each other"):
        DeidOptions(retain_modified_dates=True, retain_full_dates=True)


def test_scrubber_removes_identifiers_and_patterns() -> None:
    text = "Seen by Dr Welby on 03/04/2019, call +44 20 7946 0958, mail j.doe@example.org, MRN 5551234; ok"
    out = scrub_text(text, ["Welby"])
    assert out == "Seen by Dr * on *, call *, mail *, MRN *; ok"


def test_key_file_is_created_private_and_reused(tmp_path: Path, pydicom_file: Callable[[str], Path]) -> None:
    shutil.copy(pydicom_file("MR_small.dcm"), tmp_path / "mr.dcm")
    key = tmp_path / "secret" / "deid.key"
    deidentify(tmp_path / "mr.dcm", tmp_path / "o1", key_file=key)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    content = key.read_text()
    deidentify(tmp_path / "mr.dcm", tmp_path / "o2", key_file=key)
    assert key.read_text() == content
    assert (tmp_path / "o1" / "mr.dcm").read_bytes() == (tmp_path / "o2" / "mr.dcm").read_bytes()


def test_user_errors_name_the_problem(tmp_path: Path, pydicom_file: Callable[[str], Path]) -> None:
    with pytest.raises(InputError, match="no such file"):
        deidentify(tmp_path / "missing", tmp_path / "out", key_file=tmp_path / "key")
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match="inside the input"):
        deidentify(tmp_path / "in", tmp_path / "in" / "out", key_file=tmp_path / "key")
    with pytest.raises(InputError, match="key file must not be inside"):
        deidentify(tmp_path / "in", tmp_path / "out", key_file=tmp_path / "out" / "key")
    with pytest.raises(InputError, match="audit log must not"):
        deidentify(
            tmp_path / "in", tmp_path / "out", key_file=tmp_path / "key", audit_path=tmp_path / "in" / "a.csv"
        )
    (tmp_path / "badkey").write_text("not hex at all")
    with pytest.raises(InputError, match="not a medlens key file"):
        deidentify(tmp_path / "in", tmp_path / "out", key_file=tmp_path / "badkey")


def test_combined_codes_resolve_to_the_strictest_valid_action() -> None:
    assert profile.resolve_action("X/Z/D", None) == "X"  # not in the IOD
    assert profile.resolve_action("X/Z/D", "3") == "X"
    assert profile.resolve_action("X/Z/D", "2") == "Z"
    assert profile.resolve_action("X/Z/D", "1C") == "D"
    assert profile.resolve_action("X/Z/U*", "1") == "U*"
    assert profile.resolve_action("X/Z", "1") == "Z"
    assert profile.resolve_action("X/D", "2") == "D"
    assert profile.resolve_action("Z/D", "3") == "Z"
    ct = profile.iod_attribute_types("1.2.840.10008.5.1.4.1.1.2")
    assert ct is not None and ct[("ContentDate",)] == "2C" and ct[("InstitutionName",)] == "3"
    assert ct[("StudyDate",)] == "2" and ("NoSuchKeyword",) not in ct


def test_profile_table_matches_the_standard_on_known_rows() -> None:
    assert len(profile.BASIC_PROFILE) > 400
    assert {a for _, a in profile.BASIC_PROFILE.values()} <= {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D",
                                                              "X/Z/D", "X/Z/U*"}  # fmt: skip
    known = {"(0010,0010)": "Z", "(0010,0020)": "Z", "(0020,000D)": "U", "(0008,0080)": "X/Z/D",
             "(0008,1140)": "X/Z/U*", "(0010,1010)": "X", "(0008,103E)": "X", "(0018,1000)": "X/Z/D"}  # fmt: skip
    for tag, action in known.items():
        assert profile.BASIC_PROFILE[tag][1] == action, tag
    assert profile.rule_for(0x60023000)[1] == "X" and profile.rule_for(0x50001234)[1] == "X"
    assert profile.rule_for(0x00101010, ("retain_patient_characteristics",))[1] == "K"
    assert profile.rule_for(0x00080020, ("retain_modified_dates",))[1] == "C"


# ---- 6. command line -------------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path: Path, pydicom_file: Callable[[str], Path]) -> None:
    src = tmp_path / "in" / "patient" / "series"
    src.mkdir(parents=True)
    shutil.copy(pydicom_file("CT_small.dcm"), src / "ct.dcm")
    shutil.copy(pydicom_file("examples_ybr_color.dcm"), src / "us.dcm")
    (src / "readme.txt").write_text("hello")
    from typer.testing import CliRunner

    from medlens.cli import app

    cmd = ["medlens", "deid", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
           "--key-file", str(tmp_path / "key"), "--shift-dates", "--keep-device"]  # fmt: skip

    run = CliRunner().invoke(app, cmd[1:])
    assert run.exit_code == 0, run.output
    text = " ".join(run.output.split())
    assert "wrote 1 file(s)" in text and "quarantined" in text and "readme.txt" in text
    out = pydicom.dcmread(tmp_path / "out" / "patient" / "series" / "ct.dcm")
    assert out.StationName == "CT01_OC0" and out.LongitudinalTemporalInformationModified == "MODIFIED"
    with open(tmp_path / "out" / "deid_audit.csv", newline="") as fh:
        assert any(r["action"] == "shifted" for r in csv.DictReader(fh))
    bad = CliRunner().invoke(app, ["deid", str(tmp_path / "nope"), *cmd[3:]])
    assert isinstance(bad.exception, InputError) and "no such file" in str(
        bad.exception
    )  # main(): one line, exit 2


def test_structured_report_content_is_replaced_but_public_codes_stay(
    tmp_path: Path, pydicom_file: Callable[[str], Path]
) -> None:
    ds = pydicom.dcmread(pydicom_file("test-SR.dcm"))
    name = ds.ContentSequence[0].ConceptNameCodeSequence[0]
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    deidentify(tmp_path / "sr.dcm", tmp_path / "out", key_file=tmp_path / "key")
    out = pydicom.dcmread(tmp_path / "out" / "sr.dcm")
    # Content Sequence is D: every text, name and local code inside becomes a dummy; DCM codes keep their meaning
    texts = [e.value for e in walk(out) if e.keyword == "TextValue"]
    assert len(texts) == 7 and set(texts) == {"ANONYMIZED"}
    kept = out.ContentSequence[0].ConceptNameCodeSequence[0]
    assert (kept.CodeValue, kept.CodingSchemeDesignator, kept.CodeMeaning) == ("121071", "DCM", "Finding")
    local = out.ContentSequence[2].ConceptNameCodeSequence[0]
    assert local.CodingSchemeDesignator == "ANONYMIZED"
    assert all(e.value != "Riesmeier^Jörg" for e in walk(out) if e.VR == "PN")
    assert all(str(e.value).startswith("2.25.") for e in walk(out) if e.keyword == "UID")
