"""Apply the confidentiality profile to one pydicom data set, recursing into sequences (used by
:mod:`medlens.io.deid`, which documents the rules; the table is :mod:`medlens.io.deid_profile`).

:class:`ProfileWalk` visits every element once, depth first, decides its action from the table, the selected
options and the attribute's type in the IOD, applies it in place and records an :class:`AuditRow` for every
change. Sequence items are walked in one of three modes: ``normal`` (the table applies), ``dummy`` (inside a
``D`` sequence: text, names, dates and local codes become dummies too) and ``clean`` (inside a ``C`` sequence:
free text is scrubbed too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from medlens.io import deid_profile as profile

if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.dataelem import DataElement

    from medlens.io.deid import Deidentifier

__all__ = ["AUDIT_COLUMNS", "AuditRow", "ProfileWalk", "scrub_text"]

_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC", "AE", "UR"}
_DUMMY = {"PN": "ANONYMIZED^", "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y"}
_DUMMY.update({vr: "0" for vr in ("IS", "DS")})
_NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"}
# Inside a dummy-replaced (D) sequence, codes of public coding schemes are kept: they carry meaning, not identity
# (a code of a local "99..." scheme, e.g. a person's ID code, is replaced like any other value).
_CODE_KEYWORDS = {"CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
                  "URNCodeValue", "MappingResource", "ContextIdentifier"}  # fmt: skip
_PUBLIC_SCHEMES = {"DCM", "SCT", "SRT", "LN", "UCUM", "NCIt", "RADLEX", "FMA", "MDC", "UMLS", "I10", "ICD10"}
# Dates that version a coding resource or template, not an event in the patient's care: never touched.
_VERSION_DATES = {
    "ContextGroupVersion",
    "ContextGroupLocalVersion",
    "TemplateVersion",
    "TemplateLocalVersion",
}
# Removed wherever they occur, whatever the IOD type: an icon is a thumbnail of the image that may show burned-in
# text; encrypted attributes hold original (identifying) values for whoever holds the recipient's key.
_ALWAYS_REMOVED = {
    0x00880200: "X (icon image: a thumbnail that may show burned-in text)",
    0x04000500: "X (encrypted attributes: original values, readable with the recipient's key)",
}
# Identifiers collected for the descriptor scrubber (besides every person name).
_IDENTIFIER_KEYWORDS = (
    "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber", "StudyID", "MedicalRecordLocator",
    "PatientAddress", "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress", "StationName",
    "InstitutionalDepartmentName", "DeviceSerialNumber", "AdmissionID", "RequestedProcedureID",
)  # fmt: skip
_SCRUB_PATTERNS = re.compile(
    r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b|\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b"  # dates
    r"|[\w.+-]+@[\w-]+\.[\w.-]+"  # e-mail
    r"|\+?\d[\d ()-]{6,}\d|\b\d{5,}\b"  # phone numbers, ID numbers
)


@dataclass
class AuditRow:
    """One change made to one file (``path`` locates the element inside sequences)."""

    file: str
    path: str
    tag: str
    keyword: str
    action: str
    rule: str
    old_hash: str
    new_value: str


AUDIT_COLUMNS = [f.name for f in fields(AuditRow)]


def _scrub_identifiers(ds: Dataset) -> list[str]:
    found: set[str] = set()

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value or []:
                    visit(item)
                continue
            if elem.VR == "PN" or elem.keyword in _IDENTIFIER_KEYWORDS:
                values = elem.value if elem.VM > 1 else [elem.value]
                for v in values:
                    s = str(v or "").strip()
                    found.add(s)
                    if elem.VR == "PN":
                        found.update(re.split(r"[\^= ]+", s))

    visit(ds)
    return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)


def scrub_text(text: str, identifiers: list[str]) -> str:
    """Remove known identifiers and identifier-like patterns (dates, e-mails, long numbers) from free text."""
    out = text
    for ident in identifiers:
        out = re.sub(re.escape(ident), "*", out, flags=re.IGNORECASE)
    return _SCRUB_PATTERNS.sub("*", out)


def _date_shift(value: str, days: int, vr: str) -> str | None:
    """Shift a DA/DT string by ``days``; None when it cannot be parsed."""
    s = value.strip().replace(".", "") if vr == "DA" else value.strip()
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})(.*)", s)
    if not m or (vr == "DA" and m.group(4)):
        return None
    try:
        d = date(int(m.group(1)), int(m.group(2)), int(m.group(3))) + timedelta(days=days)
    except ValueError:
        return None
    return d.strftime("%Y%m%d") + m.group(4)


def _dummy(elem: DataElement) -> Any:
    if elem.VR in _DUMMY:
        return _DUMMY[elem.VR]
    if elem.VR in _TEXT_VRS or elem.VR == "CS":
        return "ANONYMIZED"
    if elem.VR in _NUMERIC_VRS:
        return 0
    if elem.VR in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
        return b"\0\0"
    return None


class ProfileWalk:
    """One pass of the profile over one data set (recursing into sequence items), in place.

    Args:
        deid: holds the key (UIDs, pseudonyms, date offset, audit hashes) and the options.
        ds: the data set to de-identify; modified in place, file meta included.
        label: the file name written in the audit rows.

    After :meth:`run`, ``rows`` has one :class:`AuditRow` per change and ``untouched`` counts the attributes
    outside the table left as they were.
    """

    def __init__(self, deid: Deidentifier, ds: Dataset, label: str) -> None:
        self.deid, self.ds, self.label = deid, ds, label
        self.opts = deid.options.profile_options()
        self.rows: list[AuditRow] = []
        self.untouched = 0
        # The patient is known by Patient ID, or by name when the ID is empty; both derive from this key.
        self.patient_key = str(ds.get("PatientID", "") or "").strip() or str(ds.get("PatientName", "") or "")
        self.offset = deid.date_offset_days(self.patient_key)
        self.types = profile.iod_attribute_types(str(ds.get("SOPClassUID", "")))
        cleaning = {"clean_descriptors", "retain_patient_characteristics"} & set(self.opts)
        self.identifiers = _scrub_identifiers(ds) if cleaning else []
        o = deid.options
        self.dates = "full" if o.retain_full_dates else "modified" if o.retain_modified_dates else "none"

    def run(self) -> None:
        """Apply the profile to every element, rebuild the file meta and add the de-identification record."""
        self._dataset(self.ds, (), "", "normal")
        self._file_meta()
        self._mark()

    # ---- recursion ---------------------------------------------------------------------------------------------
    def _dataset(self, d: Dataset, kws: tuple[str, ...], prefix: str, mode: str) -> None:
        for elem in list(d):
            self._element(d, elem, kws, prefix, mode)

    def _items(self, elem: DataElement, kws: tuple[str, ...], prefix: str, mode: str) -> None:
        for i, item in enumerate(elem.value or []):
            self._dataset(item, (*kws, elem.keyword or str(elem.tag)), f"{prefix}{elem.keyword}[{i}].", mode)

    def _element(self, d: Dataset, elem: DataElement, kws: tuple[str, ...], prefix: str, mode: str) -> None:
        tag, vr = elem.tag, elem.VR
        if tag.is_private:
            return self._remove(d, elem, prefix, "X (private attribute)")
        if tag.element == 0:  # group length: retired, recomputed by the writer if ever needed
            del d[tag]
            return None
        if 0x6000 <= tag.group <= 0x60FF and tag.group % 2 == 0:
            return self._remove(d, elem, prefix, "X (overlay group 60xx)")
        if tag in _ALWAYS_REMOVED:
            return self._remove(d, elem, prefix, _ALWAYS_REMOVED[tag])
        rule = profile.rule_for(tag, self.opts)
        if rule is None:
            return self._unlisted(d, elem, kws, prefix, mode)
        _, code, source = rule
        action, attr_type = code, self._type(kws, elem.keyword)
        if "/" in code:
            action = profile.resolve_action(code, attr_type)
        elif code == "X" and self.types is not None and attr_type in ("1", "1C", "2", "2C"):
            # the IOD requires it: removing it would make the object invalid; empty it or use a dummy instead
            action = profile.resolve_action("X/Z/D", attr_type)
        why = code if action == code else f"{code} -> {action} (type {attr_type or '3'} in the IOD)"
        why = why if source == "basic" else f"{why} ({source})"
        self._apply(d, elem, action, why, kws, prefix, vr)
        return None

    def _type(self, kws: tuple[str, ...], keyword: str) -> str | None:
        if self.types is None:
            return "1"
        return self.types.get((*kws, keyword))

    def _unlisted(self, d: Dataset, elem: DataElement, kws: tuple[str, ...], prefix: str, mode: str) -> None:
        vr = elem.VR
        if vr == "SQ":
            return self._items(elem, kws, prefix, mode)
        if vr in ("DA", "DT") and elem.keyword not in _VERSION_DATES:
            code = {"full": "K", "modified": "C", "none": "X/Z/D"}[self.dates]
            action = profile.resolve_action(code, self._type(kws, elem.keyword)) if "/" in code else code
            if mode == "dummy" and action == "X":
                action = "D"
            return self._apply(
                d, elem, action, f"{code} -> {action} (date outside the table)", kws, prefix, vr
            )
        public_code = (
            elem.keyword in _CODE_KEYWORDS and str(d.get("CodingSchemeDesignator", "")) in _PUBLIC_SCHEMES
        )
        if (
            mode == "dummy"
            and (vr in _TEXT_VRS or vr == "TM")
            and elem.value not in (None, "")
            and not public_code
        ):
            return self._apply(d, elem, "D", "D (inside a dummy-replaced sequence)", kws, prefix, vr)
        if mode == "clean" and vr in _TEXT_VRS:
            return self._apply(d, elem, "C", "C (inside a cleaned sequence)", kws, prefix, vr)
        self.untouched += 1
        return None

    # ---- actions -----------------------------------------------------------------------------------------------
    def _apply(
        self, d: Dataset, elem: DataElement, action: str, why: str, kws: tuple[str, ...], prefix: str, vr: str
    ) -> None:
        if vr == "SQ":
            return self._sequence(d, elem, action, why, kws, prefix)
        if action == "X":
            return self._remove(d, elem, prefix, why)
        if elem.keyword in ("PatientID", "PatientName") and action in ("Z", "D"):
            own = str(elem.value or "").strip() if elem.keyword == "PatientID" and prefix else ""
            new = self.deid.pseudonym(own or self.patient_key)
            if (
                elem.keyword == "PatientName"
            ):  # a family name component, not the retired single-component form
                new += "^"
            return self._set(elem, new, prefix, "replaced", f"{why} (keyed pseudonym)")
        if action == "Z":
            if elem.value in (None, "", b""):
                return None
            empty: Any = None if vr in _NUMERIC_VRS else b"" if vr.startswith("O") or vr == "UN" else ""
            return self._set(elem, empty, prefix, "emptied", why)
        if action == "D":
            if self.dates == "modified" and vr in ("DA", "DT") and elem.value:
                return self._shift(d, elem, prefix, why)
            if self.dates == "full" and vr in ("DA", "DT", "TM"):
                return self._keep(elem, prefix, why)
            return self._set(elem, _dummy(elem), prefix, "dummy", why)
        if action in ("U", "U*"):
            if vr != "UI" or not elem.value:
                return None
            vals = [self.deid.new_uid(v) for v in (elem.value if elem.VM > 1 else [elem.value])]
            return self._set(elem, vals if elem.VM > 1 else vals[0], prefix, "replaced", why)
        if action == "C":
            return self._clean(d, elem, prefix, why)
        return self._keep(elem, prefix, why)

    def _sequence(
        self, d: Dataset, elem: DataElement, action: str, why: str, kws: tuple[str, ...], prefix: str
    ) -> None:
        from pydicom.sequence import Sequence

        if action == "X":
            return self._remove(d, elem, prefix, why)
        if action == "Z":
            if elem.value:
                return self._set(elem, Sequence([]), prefix, "emptied", why)
            return None
        mode = {"D": "dummy", "C": "clean"}.get(action, "normal")
        if action == "K":
            self._row(elem, prefix, "kept", why, "", f"{len(elem.value or [])} item(s)")
        self._items(elem, kws, prefix, mode)
        return None

    def _clean(self, d: Dataset, elem: DataElement, prefix: str, why: str) -> None:
        vr = elem.VR
        if vr in ("DA", "DT"):
            return self._shift(d, elem, prefix, why) if elem.value else None
        if vr in _TEXT_VRS and elem.value not in (None, ""):
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            cleaned = [scrub_text(str(v), self.identifiers) for v in values]
            if cleaned == [str(v) for v in values]:
                return self._keep(elem, prefix, f"{why}: nothing identifying found")
            return self._set(elem, cleaned if elem.VM > 1 else cleaned[0], prefix, "cleaned", why)
        # times of day and time zones: dates move by whole days, so times are kept as they are
        return self._keep(elem, prefix, f"{why}: kept, dates shifted by whole days")

    def _shift(self, d: Dataset, elem: DataElement, prefix: str, why: str) -> None:
        values = [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])]
        shifted = [_date_shift(v, self.offset, elem.VR) for v in values]
        if any(s is None for s in shifted):
            return self._remove(d, elem, prefix, f"{why}: unparseable date removed")
        new = [s for s in shifted if s is not None]
        return self._set(
            elem, new if elem.VM > 1 else new[0], prefix, "shifted", f"{why} ({self.offset:+d} days)"
        )

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def _row(self, elem: DataElement, prefix: str, action: str, why: str, old: str, new: str) -> None:
        t = elem.tag
        self.rows.append(
            AuditRow(
                self.label, f"{prefix}{elem.keyword or t}", f"({t.group:04X},{t.element:04X})",
                elem.keyword, action, why, old, new[:64],
            )
        )  # fmt: skip

    def _old(self, elem: DataElement) -> str:
        return "" if elem.VR == "SQ" else self.deid.value_hash(elem.value)

    def _remove(self, d: Dataset, elem: DataElement, prefix: str, why: str) -> None:
        self._row(elem, prefix, "removed", why, self._old(elem), "")
        del d[elem.tag]

    def _set(self, elem: DataElement, value: Any, prefix: str, action: str, why: str) -> None:
        old = self._old(elem)
        elem.value = value
        new = "" if value is None else f"{len(value)} item(s)" if elem.VR == "SQ" else str(elem.value)
        self._row(elem, prefix, action, why, old, new)

    def _keep(self, elem: DataElement, prefix: str, why: str) -> None:
        self._row(elem, prefix, "kept", why, self._old(elem), str(elem.value))

    def _file_meta(self) -> None:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

        old = self.ds.get("file_meta") or FileMetaDataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = old.get("MediaStorageSOPClassUID", self.ds.get("SOPClassUID"))
        meta.MediaStorageSOPInstanceUID = self.ds.get("SOPInstanceUID", old.get("MediaStorageSOPInstanceUID"))
        # a file read without a header keeps the encoding it was read with
        implicit, little = getattr(self.ds, "original_encoding", (None, None))
        syntax = (
            "1.2.840.10008.1.2"
            if implicit
            else "1.2.840.10008.1.2.2"
            if little is False
            else "1.2.840.10008.1.2.1"
        )
        meta.TransferSyntaxUID = old.get("TransferSyntaxUID", syntax)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "MEDLENS_DEID"
        for elem in old:
            if elem.tag.element and elem.keyword not in meta and elem.keyword != "FileMetaInformationVersion":
                self._row(elem, "file_meta.", "removed", "file meta rebuilt", self._old(elem), "")
        self.ds.file_meta = meta

    def _mark(self) -> None:
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        used = [profile.OPTIONS[o] for o in self.opts]
        items = []
        for value, meaning in [profile.BASIC_PROFILE_CODE, *((o.code, o.meaning) for o in used)]:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        self.ds.PatientIdentityRemoved = "YES"
        self.ds.DeidentificationMethod = ["medlens deid: PS3.15 E.1-1 Basic Profile"] + [
            o.meaning[:64] for o in used
        ]
        self.ds.DeidentificationMethodCodeSequence = Sequence(items)
        status = {"full": "UNMODIFIED", "modified": "MODIFIED", "none": "REMOVED"}[self.dates]
        self.ds.LongitudinalTemporalInformationModified = status
        for kw in (
            "PatientIdentityRemoved",
            "DeidentificationMethod",
            "LongitudinalTemporalInformationModified",
        ):
            self._row(self.ds[kw], "", "set", "de-identification record", "", str(self.ds[kw].value))
