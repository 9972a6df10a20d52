"""Apply a trained classification run: ``ClassificationPredictor.from_run(RUN).predict(image)``.

A prediction goes through the run's preprocessing (:func:`medlens.tasks.classify_data.prepare_image`), the
fold models (their class probabilities averaged: an ensemble when several folds were trained) and the run's
decision rule from ``run.json``: the threshold chosen on validation for a binary task (or per label for a
multi-label task), the most probable class (multiclass) or the median grade (ordinal). ``predict_path`` writes ``predictions.csv`` and
``predictions.json`` with, per image: the class (binary, multiclass), the positive labels (multilabel) or the
grade (ordinal), every probability, and the threshold used.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens._fs import atomic_write_json, atomic_write_text
from medlens.errors import InputError, RunError
from medlens.io.image import Image

log = logging.getLogger(__name__)


@dataclass
class ClassificationPrediction:
    """One image's prediction.

    Attributes:
        probabilities: class (label) name -> probability.
        prediction: the predicted class name (binary, multiclass), or None.
        labels: the positive labels (multilabel), else None.
        grade: the predicted grade name (ordinal), else None; ``grade_index`` its index and ``expected_grade``
            the probability-weighted mean grade.
        threshold: the threshold used (binary: on the positive class; multilabel: per label), None for argmax.
    """

    probabilities: dict[str, float]
    prediction: str | None = None
    labels: list[str] | None = None
    grade: str | None = None
    grade_index: int | None = None
    expected_grade: float | None = None
    threshold: float | dict[str, float] | None = None
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    #: With ``predict(..., uncertainty=True)``: the normalised predictive entropy, the referral flag (None when
    #: the run has no threshold for the method) and ``{score_name, method, threshold, mutual_information, ...}``.
    uncertainty: float | None = None
    refer: bool | None = None
    uncertainty_info: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self.meta.items()}
        for key in ("prediction", "labels", "grade", "grade_index", "expected_grade"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["probabilities"] = {k: round(v, 6) for k, v in self.probabilities.items()}
        out["threshold"] = self.threshold
        if self.uncertainty is not None:
            out["uncertainty"] = round(self.uncertainty, 6)
            out["refer"] = self.refer
            out["uncertainty_detail"] = self.uncertainty_info
        return out


class ClassificationPredictor:
    """A trained classification run, ready to predict. Build it with :meth:`from_run`."""

    def __init__(
        self, run_dir: Path, info: dict[str, Any], config: Any, models: Sequence[Any], device: Any
    ) -> None:
        cls_info = info.get("classification") or {}
        if "type" not in cls_info or "class_names" not in cls_info:
            raise RunError(
                f"{run_dir}: run.json has no 'classification' section; the run did not finish training"
            )
        self.run_dir, self.info, self.config = run_dir, info, config
        self.models, self.device = list(models), device
        self.ctype: str = str(cls_info["type"])
        self.class_names: list[str] = list(cls_info["class_names"])
        self.loss: str = str(cls_info.get("loss", config["loss"]["name"]))
        self.num_channels = max(len(info["dataset"].get("channels") or {}), 1)
        self.decision: dict[str, Any] = dict(info.get("decision") or {})
        self.precision = "fp32"

    @classmethod
    def from_run(
        cls, run_dir: str | Path, folds: Sequence[int] | None = None, device: str = "auto"
    ) -> ClassificationPredictor:
        """Load ``run.json``, ``plan.json`` and ``fold_K/model.safetensors`` (nothing is unpickled).

        Args:
            run_dir: the run.
            folds: which folds to ensemble (default: every trained fold).
            device: "auto" (CUDA if present), "cpu" or "cuda".
        """
        from medlens.engine import device_for, load_weights, resolve_precision
        from medlens.models import create_model
        from medlens.plan.plan import Plan
        from medlens.tasks.classify import num_outputs
        from medlens.tasks.run import fold_dirs, read_run

        run_dir = Path(run_dir)
        info = read_run(run_dir)
        if info.get("task") != "classification":
            raise InputError(
                f"{run_dir}: a {info.get('task')} run; this predictor applies classification runs"
            )
        config = Plan.load(run_dir / "plan.json").configuration(info["configuration"])
        dev = device_for(device)
        cls_info = info.get("classification") or {}
        k = len(cls_info.get("class_names", info["dataset"]["labels"]))
        models = []
        for d in fold_dirs(run_dir, info, folds):
            model = create_model(
                dict(config["network"]),
                spatial_dims=int(config["spatial_dims"]),
                in_channels=max(len(info["dataset"].get("channels") or {}), 1),
                out_channels=num_outputs(str(cls_info.get("type")), k, str(config["loss"]["name"])),
            )
            load_weights(model, d / "model.safetensors")
            models.append(model.to(dev).eval())
        pred = cls(run_dir, info, config, models, dev)
        pred.precision = resolve_precision(str(config["training"].get("precision", "auto")), dev)
        return pred

    # ---- arrays -> decisions ----------------------------------------------------------------------------------
    def probabilities(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """Class probabilities ``(N, K)`` of preprocessed images ``(N, C, *size)``, averaged over the folds."""
        from medlens.tasks.classify import predict_scores
        from medlens.tasks.inference import autocast_for

        mirror = list(self.config.get("inference", {}).get("mirror_axes", []))
        if tta:  # only the flips the model was trained to ignore: no left-right flip of a chest film
            aug = self.config.get("augmentation", {}).get("mirror", {})
            mirror = list(aug.get("axes", [])) if float(aug.get("p", 0.0)) > 0 else mirror
        total = None
        for model in self.models:
            p = predict_scores(
                model, images, None, self.ctype, self.loss, 2 * int(self.config["batch_size"]), mirror_axes=mirror,
                autocast=lambda: autocast_for(self.device, self.precision),
            )  # fmt: skip
            total = p if total is None else total + p
        assert total is not None  # from_run guarantees a fold
        return total / len(self.models)

    def decide(self, probs: np.ndarray) -> ClassificationPrediction:
        """Apply the run's decision rule to one image's probabilities ``(K,)``."""
        from medlens.evaluate.classification import predict

        names = self.class_names
        out = ClassificationPrediction({n: float(v) for n, v in zip(names, probs, strict=True)})
        if self.ctype == "binary":
            t = float(self.decision.get("threshold", 0.5))
            out.prediction, out.threshold = names[1] if probs[1] >= t else names[0], t
        elif self.ctype == "multilabel":
            ts = self.decision.get("threshold") or [0.5] * len(names)
            out.threshold = {n: float(t) for n, t in zip(names, ts, strict=True)}
            out.labels = [n for n, p, t in zip(names, probs, ts, strict=True) if p >= t]
        elif self.ctype == "ordinal":
            g = int(predict(probs[None], "ordinal")[0])
            out.grade, out.grade_index = names[g], g
            out.expected_grade = round(float(np.dot(probs, np.arange(len(names)))), 4)
        else:
            out.prediction = names[int(np.argmax(probs))]
        return out

    # ---- images and files ------------------------------------------------------------------------------------
    def predict(
        self, image: Image, *, tta: bool = False, uncertainty: bool = False, uncertainty_method: str = "auto"
    ) -> ClassificationPrediction:
        """Classify one image (all channels stacked).

        Args:
            image: the input.
            tta: average over the flips training allowed.
            uncertainty: also return the uncertainty score and the referral flag (the decision is unchanged).
            uncertainty_method: "auto" (the run's referral method if stored), "ensemble", "mc_dropout", "tta".
        """
        from medlens.tasks.classify_data import check_image, prepare_image

        source = str(image.meta.get("source", "image"))
        check_image(image, self.config, self.num_channels, source)
        t0 = time.perf_counter()
        x = prepare_image(image, self.config)[None]
        result = self.decide(self.probabilities(x, tta=tta)[0])
        if uncertainty:
            self._add_uncertainty(result, x, uncertainty_method)
        result.seconds = time.perf_counter() - t0
        return result

    def _add_uncertainty(self, result: ClassificationPrediction, x: np.ndarray, method: str) -> None:
        from medlens.explain.uncertainty import classification_uncertainty, refer, uncertainty_settings

        chosen, referral, note, samples, seed = uncertainty_settings(self, method)
        res = classification_uncertainty(self, x, chosen, samples=samples, seed=seed)
        result.uncertainty = float(res["score"][0])
        result.refer = refer(result.uncertainty, referral)
        result.uncertainty_info = {
            "score_name": res["score_name"], "method": chosen, "samples": res["samples"],
            "threshold": None if referral is None else float(referral["threshold"]),
            "mutual_information": round(float(res["mutual_information"][0]), 6),
        }  # fmt: skip
        if note:
            result.uncertainty_info["note"] = note

    def predict_path(
        self,
        src: str | Path,
        out_dir: str | Path,
        *,
        tta: bool = False,
        probabilities: bool = True,
        series: str | None = None,
        uncertainty: bool = False,
        uncertainty_method: str = "auto",
        on_result: Callable[[str, Image, ClassificationPrediction], Sequence[Path]] | None = None,
    ) -> list[Path]:
        """Classify a file, a DICOM series folder, or a folder of images; write ``OUT/predictions.csv`` and
        ``OUT/predictions.json``.

        Args:
            src: an image file or folder.
            out_dir: the output folder.
            tta: average over mirrored copies of each image, along the axes training mirrored (none for
                modalities where left and right matter).
            probabilities: accepted for the command line's sake; probabilities are always written.
            series: the series to take from a DICOM folder with several.
            uncertainty: rows gain ``uncertainty`` (normalised predictive entropy) and ``refer``.
            uncertainty_method: see :meth:`predict`.
            on_result: called as ``on_result(name, image, result)`` after each image; the files it returns
                are appended to the returned list.

        Returns:
            The two files written.
        """
        from medlens.io import read_image
        from medlens.serve.predictor import discover_inputs

        out_dir = Path(out_dir)
        rows: list[dict[str, Any]] = []
        extra: list[Path] = []  # files on_result wrote
        for name, path, ser in discover_inputs(Path(src), series):
            image = read_image(path, series=ser) if ser is not None else read_image(path)
            result = self.predict(
                image, tta=tta, uncertainty=uncertainty, uncertainty_method=uncertainty_method
            )
            result.meta = {"case": name, "source": str(path)}
            rows.append(result.to_dict())
            if on_result is not None:  # e.g. a DICOM SR of the result (serve.dicom_out)
                extra.extend(on_result(name, image, result))
            log.info("%s: %s (%.2f s)", path, _summary(result), result.seconds)
        if not rows:
            raise InputError(f"{src}: no images to classify")
        json_path, csv_path = out_dir / "predictions.json", out_dir / "predictions.csv"
        atomic_write_json(json_path, {
            "run": str(self.run_dir), "task": "classification", "classification_type": self.ctype,
            "classes": self.class_names, "decision": {k: v for k, v in self.decision.items() if k in ("rule", "threshold", "target_sensitivity", "positive_class")},
            "folds": len(self.models), "predictions": rows,
        })  # fmt: skip
        atomic_write_text(csv_path, self.to_csv(rows))
        return [csv_path, json_path, *extra]

    def to_csv(self, rows: list[dict[str, Any]]) -> str:
        """One row per image: case, source, the decision, one probability column per class, the threshold(s)."""
        names = self.class_names
        decision_cols = {
            "binary": ["prediction"], "multiclass": ["prediction"], "multilabel": ["labels"],
            "ordinal": ["grade", "grade_index", "expected_grade"],
        }[self.ctype]  # fmt: skip
        header = ["case", "source", *decision_cols, *[f"p_{n}" for n in names]]
        if self.ctype == "binary":
            header.append("threshold")
        elif self.ctype == "multilabel":
            header += [f"threshold_{n}" for n in names]
        with_uncertainty = any("uncertainty" in r for r in rows)
        if with_uncertainty:
            header += ["uncertainty", "refer"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for r in rows:
            line = [r["case"], r["source"]]
            for col in decision_cols:
                v = r.get(col)
                line.append(";".join(v) if isinstance(v, list) else v)
            line += [r["probabilities"][n] for n in names]
            if self.ctype == "binary":
                line.append(r["threshold"])
            elif self.ctype == "multilabel":
                line += [r["threshold"][n] for n in names]
            if with_uncertainty:
                flag = r.get("refer")
                line += [r.get("uncertainty"), "" if flag is None else str(bool(flag)).lower()]
            writer.writerow(line)
        return buf.getvalue()


def _summary(r: ClassificationPrediction) -> str:
    if r.labels is not None:
        return "labels " + (", ".join(r.labels) or "none")
    if r.grade is not None:
        return f"grade {r.grade}"
    return f"{r.prediction} ({json.dumps(r.probabilities)})"
