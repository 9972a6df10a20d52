"""Apply a trained run to new images: ``Predictor.from_run(RUN).predict(image)``.

A prediction goes through exactly the preprocessing the plan prescribes, sliding-window inference with
Gaussian blending (optional mirroring TTA), an average over the run's folds (an ensemble when several were
trained), the post-processing chosen on validation, and the inverse preprocessing: the label map comes back in
exactly the input's geometry (shape, spacing, orientation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import InputError
from medlens.io.image import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (
    ".nii",
    ".nii.gz",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
)


@dataclass
class SegmentationPrediction:
    """A label map in the input's geometry, optional per-class probabilities, and how long it took."""

    label: Image
    probabilities: Image | None = None
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    #: With ``predict(..., uncertainty=True)``: the voxel-wise uncertainty map (input geometry), the per-case
    #: score, the referral flag (None when the run has no threshold for the method) and
    #: ``{score, score_name, method, refer, threshold, ...}`` (see :mod:`medlens.explain.uncertainty`).
    uncertainty: Image | None = None
    uncertainty_score: float | None = None
    refer: bool | None = None
    uncertainty_info: dict[str, Any] | None = None


class Predictor:
    """A trained segmentation run, ready to predict.

    Build it with :meth:`from_run`. Args are the run's parts: its directory, ``run.json`` content, the resolved
    plan configuration, the fold models and the device.
    """

    def __init__(
        self, run_dir: Path, info: dict[str, Any], config: Any, models: Sequence[Any], device: Any
    ) -> None:
        self.run_dir = run_dir
        self.info = info
        self.config = config
        self.models = list(models)
        self.device = device
        labels: dict[str, int] = info["dataset"]["labels"]
        self.labels = labels
        self.class_names = [n for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]
        self.num_channels = max(len(info["dataset"].get("channels") or {}), 1)
        self.modalities = {int(k): v for k, v in (info["dataset"].get("modalities") or {}).items()}
        self.precision = "fp32"
        self.backend = "torch"

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        folds: Sequence[int] | None = None,
        device: str = "auto",
        backend: str = "auto",
    ) -> Predictor:
        """Load a run directory (``run.json``, ``plan.json``, ``fold_K/model.safetensors``); nothing is unpickled.

        Args:
            run_dir: the run.
            folds: which folds to ensemble (default: every trained fold).
            device: "auto" (CUDA if present), "cpu" or "cuda".
            backend: "torch" (PyTorch, the plan's precision), "onnx" (ONNX Runtime fp32 on ``fold_K/model.onnx``,
                exported from the weights if missing or stale) or "auto": the backend training measured as faster
                on this kind of device (``inference_backend`` in ``run.json``), else torch.
        """
        from medlens.engine import device_for, load_weights, resolve_precision
        from medlens.models import create_model
        from medlens.plan.plan import Plan
        from medlens.serve.backends import check_backend
        from medlens.tasks.run import fold_dirs, read_run

        check_backend(backend)
        run_dir = Path(run_dir)
        info = read_run(run_dir)
        if info.get("task") != "segmentation":
            raise InputError(f"{run_dir}: a {info.get('task')} run; this predictor applies segmentation runs")
        plan = Plan.load(run_dir / "plan.json")
        config = plan.configuration(info["configuration"])
        dev = device_for(device)
        chosen = _resolve_backend(backend, info, dev, run_dir)
        models: list[Any] = []
        for d in fold_dirs(run_dir, info, folds):
            model = create_model(
                dict(config["network"]),
                spatial_dims=int(config["spatial_dims"]),
                in_channels=max(len(info["dataset"].get("channels") or {}), 1),
                out_channels=len(info["dataset"]["labels"]),
            )
            load_weights(model, d / "model.safetensors")
            if chosen == "onnx":
                from medlens.serve.backends import OnnxBackend
                from medlens.serve.run_export import example_shape_for, onnx_for_fold

                shape = example_shape_for(config, max(len(info["dataset"].get("channels") or {}), 1))
                models.append(OnnxBackend(onnx_for_fold(d, model, shape), dev))
            else:
                models.append(model.to(dev).eval())
        pred = cls(run_dir, info, config, models, dev)
        pred.backend = chosen
        pred.precision = (
            "fp32"
            if chosen == "onnx"
            else resolve_precision(str(config["training"].get("precision", "auto")), dev)
        )
        return pred

    # ---- one image -------------------------------------------------------------------------------------------
    def check_input(self, image: Image, source: str) -> None:
        """Refuse an image the run cannot apply to: wrong channel count, dimensionality or modality."""
        if image.num_channels != self.num_channels:
            raise InputError(
                f"{source}: has {image.num_channels} channel(s); this model was trained on {self.num_channels} "
                f"({', '.join(self.info['dataset'].get('channels', {}).values())})"
            )
        nd = self.info["dataset"].get("ndim")
        if nd and image.ndim != nd:
            raise InputError(f"{source}: is a {image.ndim}D image; this model was trained on {nd}D images")
        expected = self.modalities.get(0, "OT")
        if image.modality not in ("OT", expected) and expected != "OT":
            raise InputError(
                f"{source}: modality {image.modality}; this model was trained on {expected} images"
            )

    def predict(
        self,
        image: Image,
        *,
        tta: bool = False,
        probabilities: bool = False,
        uncertainty: bool = False,
        uncertainty_method: str = "auto",
    ) -> SegmentationPrediction:
        """Segment one (multi-channel) image; the result has exactly the input's geometry.

        Args:
            image: the input, all channels stacked.
            tta: mirroring test-time augmentation along every spatial axis (2^ndim passes per fold).
            probabilities: also return per-class probabilities (resampled to the input grid).
            uncertainty: also return the uncertainty map, score and referral flag (extra passes; the label map
                is the same as without).
            uncertainty_method: "auto" (the run's referral method if stored), "ensemble", "mc_dropout", "tta".
        """
        import torch

        from medlens.plan.preprocess import invert, preprocess_case
        from medlens.tasks.inference import sliding_window_logits
        from medlens.tasks.segment import keep_largest_component

        source = str(image.meta.get("source", "image"))
        self.check_input(image, source)
        t0 = time.perf_counter()
        data, _, pinfo = preprocess_case(image, None, self.config, case_id=Path(source).name)
        inf = self.config.get("inference", {})
        spatial_dims = int(self.config["spatial_dims"])
        slice_axis = (
            self.config.get("sampling", {}).get("slice_axis")
            if spatial_dims == 2 and data.ndim == 4
            else None
        )
        mirror = list(range(spatial_dims)) if tta else list(inf.get("mirror_axes", []))
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        probs = None
        for model in self.models:
            p = sliding_window_logits(
                model,
                x,
                list(inf.get("roi_size", self.config["patch_size"])),
                overlap=float(inf.get("overlap", 0.25)),
                sw_batch_size=int(inf.get("sw_batch_size", 4)),
                mirror_axes=mirror,
                precision=self.precision,
                device=self.device,
                slice_axis=slice_axis,
            )
            probs = p if probs is None else probs + p
        assert probs is not None  # from_run guarantees at least one fold
        probs /= len(self.models)
        labels = probs.argmax(0).numpy().astype(np.uint8)
        keep = [i + 1 for i, n in enumerate(self.class_names) if self.info.get("postprocessing", {}).get(n)]
        if keep:
            labels = keep_largest_component(labels, keep)
        label_arr = invert(labels, pinfo, is_label=True)
        label_img = Image(label_arr[None], image.affine.copy(), modality="SEG", meta={"source": source})
        prob_img = None
        if probabilities:
            # Outside the cropped region the image was empty: background with certainty.
            fg = invert(probs.numpy()[1:], pinfo, is_label=False, fill=0.0)
            prob_arr = np.concatenate([1.0 - fg.sum(0, keepdims=True), fg])
            prob_img = Image(
                prob_arr.astype(np.float32), image.affine.copy(), modality="OT", meta={"source": source}
            )
        result = SegmentationPrediction(label_img, prob_img, 0.0, {"folds": len(self.models)})
        if uncertainty:
            self._add_uncertainty(result, image, uncertainty_method)
        result.seconds = time.perf_counter() - t0
        return result

    def _add_uncertainty(self, result: SegmentationPrediction, image: Image, method: str) -> None:
        from medlens.explain.uncertainty import refer, segmentation_uncertainty, uncertainty_settings

        chosen, referral, note, samples, seed = uncertainty_settings(self, method)
        _, umap, score = segmentation_uncertainty(self, image, chosen, samples=samples, seed=seed)
        result.uncertainty, result.uncertainty_score = umap, score
        result.refer = refer(score, referral)
        result.uncertainty_info = {
            "score": score, "score_name": umap.meta["score_name"], "method": chosen, "refer": result.refer,
            "threshold": None if referral is None else float(referral["threshold"]),
            "score_region": umap.meta["score_region"], "samples": umap.meta["samples"],
            "mutual_information": umap.meta["mutual_information"],
        }  # fmt: skip
        if note:
            result.uncertainty_info["note"] = note

    # ---- files and folders -----------------------------------------------------------------------------------
    def predict_path(
        self,
        src: str | Path,
        out_dir: str | Path,
        *,
        tta: bool = False,
        probabilities: bool = False,
        series: str | None = None,
        uncertainty: bool = False,
        uncertainty_method: str = "auto",
        on_result: Callable[[str, Image, SegmentationPrediction], Sequence[Path]] | None = None,
    ) -> list[Path]:
        """Predict a file, a DICOM series folder, or a folder of them; write ``OUT/<name>.nii.gz`` label maps.

        Returns:
            The label-map paths written (probabilities go to ``<name>_probabilities.nii.gz``; with
            ``uncertainty``, the map to ``<name>_uncertainty.nii.gz`` and ``{score, score_name, method, refer,
            threshold}`` to ``<name>_uncertainty.json``).
            ``on_result(name, image, result)``, when given, runs after each input; the files it returns are
            added to the list.
        """
        from medlens._fs import atomic_write_json
        from medlens.io import read_image, write_image

        out_dir = Path(out_dir)
        written = []
        for name, path, ser in discover_inputs(Path(src), series):
            image = read_image(path, series=ser) if ser is not None else read_image(path)
            result = self.predict(
                image,
                tta=tta,
                probabilities=probabilities,
                uncertainty=uncertainty,
                uncertainty_method=uncertainty_method,
            )
            target = out_dir / f"{name}.nii.gz"
            write_image(result.label, target)
            if result.probabilities is not None:
                write_image(result.probabilities, out_dir / f"{name}_probabilities.nii.gz")
            if result.uncertainty is not None and result.uncertainty_info is not None:
                write_image(result.uncertainty, out_dir / f"{name}_uncertainty.nii.gz")
                record = {"case": name, "source": str(path), **result.uncertainty_info}
                record["uncertainty"] = record["score"]  # the contract's name for the score
                atomic_write_json(out_dir / f"{name}_uncertainty.json", record)
            log.info("%s -> %s (%.1f s)", path, target, result.seconds)
            written.append(target)
            if on_result is not None:  # e.g. DICOM-SEG/SR next to the label map (serve.dicom_out)
                written.extend(on_result(name, image, result))
        return written


def _resolve_backend(backend: str, info: dict[str, Any], device: Any, run_dir: Path) -> str:
    """The backend to use: an explicit "torch"/"onnx", or for "auto" the one training measured as faster."""
    from medlens.serve.backends import onnx_available

    if backend == "onnx":
        if not onnx_available():
            raise InputError(
                "backend 'onnx' needs onnxruntime and onnx (pip install onnxruntime onnx), or use 'torch'"
            )
        return "onnx"
    if backend == "torch":
        return "torch"
    record = info.get("inference_backend") or {}
    measured_on = str(record.get("device", "")).split(":")[0]
    if record.get("choice") == "onnx" and measured_on == device.type and onnx_available():
        log.info("%s: using ONNX Runtime (%s)", run_dir, record.get("reason", "measured faster"))
        return "onnx"
    return "torch"


def discover_inputs(src: Path, series: str | None = None) -> list[tuple[str, Path, str | None]]:
    """What to predict in ``src``: ``(output name, path, series)`` for a file, a series folder or a folder of them."""
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if src.is_file():
        return [(_stem(src), src, None)]
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if files:
        return [(_stem(p), p, None) for p in files]
    from medlens.io.dicom import list_series

    found = list_series(src)
    if series is not None:
        return [(f"{src.name}_{series}", src, series)]
    if len(found) == 1:
        return [(src.name, src, None)]
    return [
        (f"{s.number if s.number is not None else n}_{s.uid[-12:]}", src, s.uid) for n, s in enumerate(found)
    ]


def _stem(p: Path) -> str:
    name = p.name
    for ext in (*IMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name
