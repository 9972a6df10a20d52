"""DICOM-SEG from a medlens label map: frames on the source's pixel grid, coded segment descriptions.

A segmentation :class:`~medlens.serve.predictor.Predictor` returns its label map in exactly the input's
geometry. To write it as DICOM-SEG (with highdicom), every frame of the source (each file of a series, or each
frame of an enhanced multi-frame file) is given the labels *of its own pixels*: each pixel's centre is taken
to world coordinates through the source's ImagePositionPatient, ImageOrientationPatient and PixelSpacing (LPS),
then to a voxel index of the label map through its RAS+ affine. The indices must land on the voxel grid (an
integer within 0.05 voxel) inside the map; anything else means the label map does not have the source's
geometry and is an error, never a silent resampling. Frames without patient geometry (secondary capture, a 2D
radiograph) are matched by order.

Segment descriptions carry the label name, algorithm type AUTOMATIC, the algorithm identification (medlens,
its version, the run name) and the category/type/anatomy codes of :mod:`medlens.io.dicom_codes`. Every
foreground label of the run gets a segment; an absent one has no frame. :func:`read_segmentation` reads any
DICOM-SEG back into per-source-image frames.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import InputError
from medlens.io.dicom_codes import LOCAL_SCHEME, local_scheme_item, segment_codes
from medlens.io.dicom_file import frame_item
from medlens.io.image import LPS_RAS_FLIP, Image

log = logging.getLogger(__name__)

#: How far (in voxels) a source pixel centre may lie from the label map's grid.
GRID_TOL = 0.05

# A distinct display colour (RGB) per segment, cycled.
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190),
)  # fmt: skip


# ---- geometry: label map -> source frames --------------------------------------------------------------------
@dataclass(frozen=True)
class _Plane:
    position: np.ndarray | None  # LPS ImagePositionPatient of the frame, or None without geometry
    row: np.ndarray | None  # direction in which the column index grows
    col: np.ndarray | None  # direction in which the row index grows
    spacing: tuple[float, float]  # PixelSpacing (between rows, between columns)
    rows: int
    cols: int


def _floats(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    try:
        return np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def source_planes(sources: Sequence[Any]) -> list[_Plane]:
    """The plane of every source frame, in the order highdicom expects SEG frames (file order, frame order)."""
    planes = []
    for ds in sources:
        rows, cols = int(ds.Rows), int(ds.Columns)
        nframes = int(ds.get("NumberOfFrames") or 1)
        enhanced = "PerFrameFunctionalGroupsSequence" in ds
        for f in range(nframes):
            if enhanced:
                pos = _floats(frame_item(ds, f, "PlanePositionSequence").get("ImagePositionPatient"))
                iop = _floats(frame_item(ds, f, "PlaneOrientationSequence").get("ImageOrientationPatient"))
                sp = _floats(frame_item(ds, f, "PixelMeasuresSequence").get("PixelSpacing"))
            else:
                pos = _floats(ds.get("ImagePositionPatient")) if nframes == 1 else None
                iop = _floats(ds.get("ImageOrientationPatient"))
                sp = _floats(ds.get("PixelSpacing"))
            spacing = (float(sp[0]), float(sp[1])) if sp is not None and len(sp) == 2 else (1.0, 1.0)
            geometric = pos is not None and len(pos) == 3 and iop is not None and len(iop) == 6
            planes.append(
                _Plane(
                    pos if geometric else None,
                    iop[:3] if geometric and iop is not None else None,
                    iop[3:] if geometric and iop is not None else None,
                    spacing,
                    rows,
                    cols,
                )
            )
    return planes


def label_frames(label: Image, sources: Sequence[Any]) -> np.ndarray:
    """The label map resampled *exactly* onto each source frame's pixel grid: ``(frames, rows, columns)``.

    Args:
        label: a one-channel label map in the geometry of the source series (what the predictor returns).
        sources: the source DICOM datasets (headers suffice), one per file, in any order.

    Raises:
        InputError: the label map has several channels, or its grid does not hold a source frame's pixels
            (it was not predicted on this series).
    """
    if label.num_channels != 1:
        raise InputError(f"a label map has one channel; this one has {label.num_channels}")
    if not sources:
        raise InputError(
            "no source DICOM datasets to reference; SEG needs the DICOM source of the prediction"
        )
    arr = np.asarray(label.array[0])
    planes = source_planes(sources)
    out = np.zeros((len(planes), planes[0].rows, planes[0].cols), dtype=arr.dtype)
    if len({(p.rows, p.cols) for p in planes}) > 1:
        raise InputError("the source frames have different sizes; SEG needs one series of equal-size frames")
    if all(p.position is None for p in planes):
        return _frames_by_order(arr, planes, out)
    if any(p.position is None for p in planes):
        raise InputError("some source frames lack ImagePositionPatient; cannot place the label map on them")
    if label.ndim != 3:
        raise InputError("a 2D label map cannot be placed on source frames that have patient geometry")
    inv = np.linalg.inv(label.affine @ np.eye(4)) @ LPS_RAS_FLIP  # LPS world -> label voxel index
    r, c = np.mgrid[0 : planes[0].rows, 0 : planes[0].cols]
    corners = np.array(
        [[0, 0], [0, planes[0].cols - 1], [planes[0].rows - 1, 0], [planes[0].rows - 1, planes[0].cols - 1]]
    )
    for n, p in enumerate(planes):
        assert p.position is not None and p.row is not None and p.col is not None  # checked above
        # index = base + column * step_c + row * step_r: affine in (row, column), so checking the integer model
        # at the four corners bounds its error (and the extent) over the whole frame
        base = inv[:3, :3] @ p.position + inv[:3, 3]
        step_c = inv[:3, :3] @ (p.spacing[1] * p.row)
        step_r = inv[:3, :3] @ (p.spacing[0] * p.col)
        nb, nc, nr = np.rint(base), np.rint(step_c), np.rint(step_r)
        exact = base + corners[:, 1:2] * step_c + corners[:, 0:1] * step_r
        model = nb + corners[:, 1:2] * nc + corners[:, 0:1] * nr
        off = float(np.abs(exact - model).max())
        if off > GRID_TOL or np.any(model < 0) or np.any(model >= np.asarray(arr.shape)):
            where = f"off the grid by {off:.2f} voxel" if off > GRID_TOL else "outside the map"
            raise InputError(
                f"the label map {label.spatial_shape} does not have the geometry of source frame {n + 1} "
                f"(its pixels fall {where}); write DICOM results only for predictions made on that series"
            )
        ii = [(int(nb[a]) + c * int(nc[a]) + r * int(nr[a])) for a in range(3)]
        out[n] = arr[ii[0], ii[1], ii[2]]
    return out


def _frames_by_order(arr: np.ndarray, planes: list[_Plane], out: np.ndarray) -> np.ndarray:
    """Frames without patient geometry: frame n is slice n (3D) or the image itself (2D)."""
    rows, cols = planes[0].rows, planes[0].cols
    slices = 1 if arr.ndim == 2 else arr.shape[2]
    if arr.shape[:2] != (cols, rows) or slices != len(planes):
        raise InputError(
            f"the label map {arr.shape} does not match the {len(planes)} source frame(s) of "
            f"{rows} rows x {cols} columns; write DICOM results only for predictions made on that image"
        )
    for n in range(len(planes)):
        out[n] = (arr if arr.ndim == 2 else arr[:, :, n]).T
    return out


# ---- the SEG object ----------------------------------------------------------------------------------------------
def segment_volumes(label: Image, labels: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Per foreground label, its size: ``{"voxels", "mm3"}`` for a 3D map, ``{"voxels", "mm2"}`` for a 2D one.

    The size is the voxel (pixel) count times the voxel volume (pixel area) of the label map: a 2D map (a film)
    has areas, and its key says so (:func:`medlens.io.dicom_sr.segmentation_report` reports them as Area in
    mm2, not as a volume).
    """
    arr = np.asarray(label.array[0])
    nd = label.ndim
    unit = "mm3" if nd == 3 else "mm2"
    voxel = float(abs(np.linalg.det(label.affine[:nd, :nd])))
    values, counts = np.unique(arr, return_counts=True)
    count = dict(zip(values.tolist(), counts.tolist(), strict=True))
    return {
        name: {"voxels": float(count.get(value, 0)), unit: float(count.get(value, 0)) * voxel}
        for name, value in sorted(labels.items(), key=lambda kv: kv[1])
        if value != 0
    }


def build_segmentation(
    label: Image,
    sources: Sequence[Any],
    labels: Mapping[str, int],
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int,
    codes: Mapping[str, Any] | None = None,
    manufacturer: str = "medlens",
    model_name: str = "medlens",
    device_serial: str = "medlens",
    series_description: str = "medlens segmentation",
) -> Any:
    """A BINARY ``highdicom.seg.Segmentation`` of ``label`` referencing ``sources``, in a new series.

    BINARY, not LABELMAP: highdicom 0.28 writes Label Map Segmentation Storage, but dciodvfy (dicom3tools) does
    not know that SOP class yet, and many viewers and PACS do not either. Segment numbers are 1..K in the order
    of the label values (label value v becomes segment ``rank(v)``); every foreground label gets a segment,
    present or not (an absent one simply has no frame).

    Args:
        label: the label map in the sources' geometry.
        sources: the source datasets (one series, any order).
        labels: name -> label value (``run.json["dataset"]["labels"]``; 0 is background).
        algorithm_name: e.g. ``"medlens blobs"``; algorithm_version: e.g. ``"0.1.0 run bt"``.
        series_number: the new series' number.
        codes: per-name code overrides (see :func:`segment_codes`).
        manufacturer, model_name, device_serial, series_description: written into the SEG (the serial
            number identifies the model, e.g. the run name).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes
    from pydicom.uid import generate_uid

    frames = label_frames(label, sources)
    foreground = [(n, v) for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]
    if not foreground:
        raise InputError("the run has no foreground label to write as a segment")
    seg_array = np.zeros(frames.shape, dtype=np.uint8 if len(foreground) < 256 else np.uint16)
    for number, (_, value) in enumerate(foreground, start=1):
        seg_array[frames == value] = number
    unnamed = sorted(set(np.unique(frames).tolist()) - {0, *labels.values()})
    if unnamed:
        log.warning("label values %s have no name in the run's labels; left out of the SEG", unnamed)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64],
        family=dcm_codes.cid7162.ArtificialIntelligence,
        version=algorithm_version[:64],
        source="medlens",
    )
    descriptions = []
    for number, (name, _) in enumerate(foreground, start=1):
        c = segment_codes(name, codes)
        r, g, b = _PALETTE[(number - 1) % len(_PALETTE)]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=c.category,
                segmented_property_type=c.type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=generate_uid(),
                tracking_id=f"{name} (medlens)"[:64],
                anatomic_regions=[c.anatomy] if c.anatomy is not None else None,
                display_color=hd.color.CIELabColor.from_rgb(r, g, b),
            )
        )
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=seg_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name[:64],
        software_versions=algorithm_version[:64],
        device_serial_number=device_serial[:64] or "medlens",
        content_label="MEDLENS_SEG",
        content_description=series_description[:64],
        content_creator_name="medlens^automatic",
        omit_empty_frames=bool(seg_array.any()),  # nothing found: keep the (empty) frames, as DICOM needs one
    )
    seg.SeriesDescription = series_description[:64]
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        # no patient geometry (a 2D film, a secondary capture): the General Image module then wants the
        # source's PatientOrientation (type 2C: empty when the source does not say)
        seg.PatientOrientation = sources[0].get("PatientOrientation") or ""
    if any(
        str(d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) == LOCAL_SCHEME
        for d in descriptions
    ):
        seg.CodingSchemeIdentificationSequence = [local_scheme_item()]
    return seg


# ---- reading a SEG back ----------------------------------------------------------------------------------------
@dataclass
class SegmentationFile:
    """What a DICOM-SEG holds, per referenced source frame.

    Attributes:
        segments: segment number -> label.
        types: segment number -> (code value, coding scheme, meaning) of the segmented property type.
        frames: ``(source SOPInstanceUID, source frame number)`` -> ``(rows, columns)`` array of segment
            numbers (0 = none); the frame number is 1 for single-frame sources. Every single-frame source the
            SEG references is present (as zeros when empty); a multi-frame source's frames only where the SEG
            has a frame for them (see :meth:`frame`).
        source_series: the referenced source SeriesInstanceUID(s).
        dataset: the highdicom ``Segmentation``.
    """

    segments: dict[int, str]
    types: dict[int, tuple[str, str, str]]
    frames: dict[tuple[str, int], np.ndarray]
    source_series: list[str]
    dataset: Any

    def frame(self, sop_instance_uid: str, number: int = 1) -> np.ndarray:
        """The segment numbers on one source frame (zeros when the SEG has nothing there)."""
        found = self.frames.get((sop_instance_uid, number))
        if found is not None:
            return found
        return np.zeros((int(self.dataset.Rows), int(self.dataset.Columns)), dtype=np.uint8)


def _source_references(seg: Any) -> dict[str, set[int]]:
    """Source SOPInstanceUID -> the source frame numbers SEG frames derive from (empty: a single-frame source)."""
    from pydicom.multival import MultiValue

    refs: dict[str, set[int]] = {str(sop): set() for _, _, sop in seg.get_source_image_uids()}
    for item in seg.get("PerFrameFunctionalGroupsSequence") or []:
        for derivation in item.get("DerivationImageSequence") or []:
            for src in derivation.get("SourceImageSequence") or []:
                numbers = src.get("ReferencedFrameNumber")
                if numbers is None or str(src.ReferencedSOPInstanceUID) not in refs:
                    continue
                values = list(numbers) if isinstance(numbers, MultiValue | list) else [numbers]
                refs[str(src.ReferencedSOPInstanceUID)].update(int(n) for n in values)
    return refs


def read_segmentation(path: str | Path) -> SegmentationFile:
    """Read a DICOM-SEG (BINARY or FRACTIONAL, any writer) into per-source-frame segment-number frames.

    Frames are matched to source images by their DerivationImageSequence references (spatial locations need
    not be declared preserved: older writers leave it out). Overlapping segments keep the highest number.

    Raises:
        ImageReadError: not a readable DICOM-SEG.
    """
    import highdicom as hd

    from medlens.errors import ImageReadError
    from medlens.io._reading import reading

    path = Path(path)
    with reading(path, "DICOM-SEG file", "is it a Segmentation Storage object?"):
        seg = hd.seg.segread(path)
        segments = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
        types = {
            int(s.SegmentNumber): (
                str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue),
                str(s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator),
                str(s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning),
            )
            for s in seg.SegmentSequence
        }
        frames: dict[tuple[str, int], np.ndarray] = {}
        for sop, numbers in _source_references(seg).items():
            if not numbers:
                px = seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=[sop],
                    combine_segments=True,
                    ignore_spatial_locations=True,
                    skip_overlap_checks=True,
                )
                frames[(sop, 1)] = np.asarray(px[0])
                continue
            ordered = sorted(numbers)
            px = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=sop,
                source_frame_numbers=ordered,
                combine_segments=True,
                ignore_spatial_locations=True,
                skip_overlap_checks=True,
            )
            frames.update({(sop, n): np.asarray(px[m]) for m, n in enumerate(ordered)})
        series = sorted({str(ser) for _, ser, _ in seg.get_source_image_uids()})
    if not segments:
        raise ImageReadError(path, "is a DICOM-SEG without segments")
    return SegmentationFile(segments, types, frames, series, seg)
