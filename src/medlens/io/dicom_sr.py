"""TID 1500 measurement reports (Comprehensive 3D SR, highdicom) of medlens predictions.

* Segmentation: one volumetric ROI group (TID 1411) per segment, with its volume in mm3 (UCUM ``mm3``, voxel
  count times voxel volume) and a reference to the segment of the DICOM-SEG. The reference is the volumetric
  form (ReferencedSegment with the source *series*): a planar reference naming both ReferencedSegmentNumber
  and ReferencedFrameNumber fails dciodvfy, and highdicom's ``ReferencedSegment.from_segmentation`` fails on
  a one-segment SEG (see FACTS.md), so the reference is built directly.
* Classification: one measurement group (TID 1501) referencing the source image(s), with every class
  probability (UCUM ``1``), the decision as a qualitative evaluation, and the decision threshold(s).
* Either: when the prediction carries an uncertainty score and a refer flag, an uncertainty measurement, the
  referral threshold and a "referral recommended" Yes/No evaluation.

Concepts without a standard code (class names, "probability of <class>", the uncertainty score) are coded in
the local scheme ``99MEDLENS``, declared in the SR's CodingSchemeIdentificationSequence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medlens.io.dicom_codes import LOCAL_SCHEME, local_scheme_item, segment_codes


@dataclass
class ReportContext:
    """Who made the results and how: written into every SR.

    Attributes:
        algorithm_name: e.g. ``"medlens blobs"``.
        algorithm_version: e.g. ``"0.1.0 run bt"`` (medlens version and run name).
        series_number: the SR series' number.
        manufacturer: Manufacturer of the SR (the software's maker).
        device_uid: a UID identifying the algorithm as an observer device (stable per run).
        uncertainty: the prediction's uncertainty score, or None.
        uncertainty_name: what the score is (e.g. "predictive entropy").
        refer: the referral flag, or None.
        refer_threshold: the uncertainty above which a case is referred, or None.
        series_description: SeriesDescription of the SR.
    """

    algorithm_name: str
    algorithm_version: str
    series_number: int
    manufacturer: str = "medlens"
    device_uid: str = ""
    uncertainty: float | None = None
    uncertainty_name: str = "uncertainty score"
    refer: bool | None = None
    refer_threshold: float | None = None
    series_description: str = "medlens measurements"


def local_code(value: str, meaning: str) -> Any:
    """A concept in the local ``99MEDLENS`` scheme (value cut to the 16 characters DICOM allows)."""
    from highdicom.sr import CodedConcept

    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:16] or "x"
    return CodedConcept(value=clean, scheme_designator=LOCAL_SCHEME, meaning=meaning[:64])


def _unitless() -> Any:
    from pydicom.sr.codedict import codes

    return codes.UCUM.NoUnits


def _algorithm(ctx: ReportContext) -> Any:
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(name=ctx.algorithm_name[:64], version=ctx.algorithm_version[:64])


def _observation_context(ctx: ReportContext) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=ctx.device_uid or generate_uid(entropy_srcs=[ctx.algorithm_name, ctx.algorithm_version]),
        name=ctx.algorithm_name[:64],
        manufacturer_name=ctx.manufacturer,
        model_name=ctx.algorithm_version[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _uncertainty_items(ctx: ReportContext) -> tuple[list[Any], list[Any]]:
    """Measurements and qualitative evaluations of the uncertainty and referral, when there are any."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    measurements: list[Any] = []
    evaluations: list[Any] = []
    if ctx.uncertainty is not None:
        measurements.append(
            hd.sr.Measurement(
                name=local_code("uncertainty", f"Uncertainty ({ctx.uncertainty_name})"),
                value=float(ctx.uncertainty),
                unit=_unitless(),
                algorithm_id=_algorithm(ctx),
            )
        )
    if ctx.refer_threshold is not None:
        measurements.append(
            hd.sr.Measurement(
                name=local_code("refer-threshold", "Referral threshold on the uncertainty"),
                value=float(ctx.refer_threshold),
                unit=_unitless(),
            )
        )
    if ctx.refer is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=local_code("refer", "Referral to a human reader recommended"),
                value=codes.SCT.Yes if ctx.refer else codes.SCT.No,
            )
        )
    return measurements, evaluations


def _report(evidence: Sequence[Any], groups: list[Any], ctx: ReportContext) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    content = hd.sr.MeasurementReport(
        observation_context=_observation_context(ctx),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=content[0],
        series_instance_uid=generate_uid(),
        series_number=int(ctx.series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = ctx.series_description[:64]
    sr.SoftwareVersions = ctx.algorithm_version[:64]
    sr.CodingSchemeIdentificationSequence = [local_scheme_item()]
    return sr


# ---- segmentation ------------------------------------------------------------------------------------------------
def segmentation_report(
    seg: Any,
    sources: Sequence[Any],
    volumes: Mapping[str, Mapping[str, float]],
    ctx: ReportContext,
    codes: Mapping[str, Any] | None = None,
) -> Any:
    """A TID 1500 SR with the volume of every segment of ``seg``, each referencing its segment.

    Args:
        seg: the DICOM-SEG (highdicom ``Segmentation`` or a read dataset) made from the same prediction.
        sources: the source image datasets the SEG references (they become evidence).
        volumes: segment label -> ``{"mm3": ...}`` (:func:`medlens.io.dicom_seg.segment_volumes`), in segment
            number order; ``{"mm2": ...}`` (a 2D map) is reported as an Area in mm2.
        ctx: who and how, uncertainty and referral.
        codes: the run's ``segment_codes`` overrides (same as the SEG's).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm

    by_label = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    source_series = str(sources[0].SeriesInstanceUID)
    groups: list[Any] = []
    for name, vol in volumes.items():
        if name[:64] not in by_label:
            continue
        segment = by_label[name[:64]]
        c = segment_codes(name, codes)
        tracking_uid = str(segment.get("TrackingUID") or "") or None
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid, identifier=f"{name} (medlens)"[:64]
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=int(segment.SegmentNumber),
                    source_series=hd.sr.SourceSeriesForSegmentation(source_series),
                ),
                finding_type=c.type,
                finding_category=c.category,
                finding_sites=[hd.sr.FindingSite(c.anatomy)] if c.anatomy is not None else None,
                algorithm_id=_algorithm(ctx),
                measurements=[
                    hd.sr.Measurement(  # a 2D map (a film) has areas: segment_volumes gives "mm2" then
                        name=dcm.SCT.Volume if "mm3" in vol else dcm.SCT.Area,
                        value=float(vol["mm3"] if "mm3" in vol else vol["mm2"]),
                        unit=dcm.UCUM.CubicMillimeter if "mm3" in vol else dcm.UCUM.SquareMillimeter,
                        algorithm_id=_algorithm(ctx),
                    )
                ],
            )
        )
    measurements, evaluations = _uncertainty_items(ctx)
    if measurements or evaluations:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(identifier="segmentation uncertainty"),
                finding_type=local_code("seg-uncertainty", "Segmentation uncertainty"),
                algorithm_id=_algorithm(ctx),
                measurements=measurements or None,
                qualitative_evaluations=evaluations or None,
                source_images=_source_images(sources),
            )
        )
    return _report([seg, *sources], groups, ctx)


def _source_images(sources: Sequence[Any]) -> list[Any]:
    import highdicom as hd

    return [
        hd.sr.SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in sources
    ]


# ---- classification ----------------------------------------------------------------------------------------------
def classification_report(
    prediction: Any, class_names: Sequence[str], sources: Sequence[Any], ctx: ReportContext, task: str = ""
) -> Any:
    """A TID 1500 SR with a classification's probabilities, decision and threshold(s), referencing the source.

    Args:
        prediction: a :class:`~medlens.serve.classify.ClassificationPrediction`.
        class_names: the run's classes, in output order (each gets a local code ``class-<index>``).
        sources: the classified image's dataset(s).
        ctx: who and how, uncertainty and referral.
        task: a short name of what is classified (the dataset name), used in the finding type.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    index = {n: i for i, n in enumerate(class_names)}

    def class_code(name: str) -> Any:
        return local_code(f"class-{index.get(name, name)}", name)

    measurements: list[Any] = [
        hd.sr.Measurement(
            name=local_code(f"p-{index[n]}", f"Probability of {n}"),
            value=float(prediction.probabilities[n]),
            unit=_unitless(),
            algorithm_id=_algorithm(ctx),
        )
        for n in class_names
        if n in prediction.probabilities
    ]
    evaluations: list[Any] = []
    if prediction.prediction is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=local_code("predicted-class", "Predicted class"), value=class_code(prediction.prediction)
            )
        )
    if prediction.labels is not None:
        for n in class_names:
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=local_code(f"label-{index[n]}", f"{n} present"),
                    value=codes.SCT.Yes if n in prediction.labels else codes.SCT.No,
                )
            )
    if prediction.grade is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=local_code("predicted-grade", "Predicted grade"), value=class_code(prediction.grade)
            )
        )
    if prediction.expected_grade is not None:
        measurements.append(
            hd.sr.Measurement(
                name=local_code("expected-grade", "Probability-weighted mean grade index"),
                value=float(prediction.expected_grade),
                unit=_unitless(),
            )
        )
    threshold = prediction.threshold
    if isinstance(threshold, Mapping):
        for n, t in threshold.items():
            measurements.append(
                hd.sr.Measurement(
                    name=local_code(f"threshold-{index.get(n, n)}", f"Decision threshold for {n}"),
                    value=float(t),
                    unit=_unitless(),
                )
            )
    elif threshold is not None:
        measurements.append(
            hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=float(threshold), unit=_unitless())
        )
    more_m, more_e = _uncertainty_items(ctx)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"{task or 'image'} classification"[:64]),
        finding_type=local_code("classification", f"{task or 'image'} classification"),
        algorithm_id=_algorithm(ctx),
        measurements=measurements + more_m,
        qualitative_evaluations=(evaluations + more_e) or None,
        source_images=_source_images(sources),
    )
    return _report(list(sources), [group], ctx)
