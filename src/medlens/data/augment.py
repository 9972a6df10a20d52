"""Batched data augmentation in torch: the plan's ``augmentation`` section applied to a whole batch at once.

Per-sample Python transforms are the CPU bottleneck of patch-based training, so every transform here draws its
random parameters for the whole batch (from one ``torch.Generator``, so a batch is reproducible) and applies
them with a few tensor operations: one ``affine_grid``/``grid_sample`` for rotation + scaling of all samples
that drew one (the label map with nearest-neighbour sampling on the same grid, so image and label stay
aligned), ``flip`` for mirroring, and broadcasted arithmetic for the intensity transforms. Works for 2D and 3D,
on CPU or CUDA (parameters are drawn on the CPU and moved to the batch's device).

The ``augmentation`` section (every transform optional; a missing key takes nnU-Net's default)::

    {"mirror":     {"p": 0.5,  "axes": [0, 1, 2]},            # per axis
     "rotation":   {"p": 0.2,  "degrees": 30, "planes": [[0, 1], [0, 2], [1, 2]]},
     "scaling":    {"p": 0.2,  "range": [0.7, 1.4]},          # >1 zooms out
     "gamma":      {"p": 0.3,  "range": [0.7, 1.5], "invert_p": 0.1},
     "noise":      {"p": 0.1,  "std": [0.0, 0.1]},
     "brightness": {"p": 0.15, "range": [0.75, 1.25]},
     "contrast":   {"p": 0.15, "range": [0.75, 1.25]},
     "mixup":      {"p": 0.0,  "alpha": 0.2}}                  # classification only, see below

``mixup`` (off by default) is validated here with the rest but applied by the classification task
(:class:`medlens.tasks.classify.ClassificationTask`), since it mixes the targets too: with probability ``p`` a
batch becomes ``lam x + (1 - lam) x[perm]`` with ``lam ~ Beta(alpha, alpha)``; :class:`BatchAugment` ignores it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medlens.errors import InputError, did_you_mean

if TYPE_CHECKING:
    import torch

#: transform -> its keys and nnU-Net's default values.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mirror": {"p": 0.5, "axes": None},
    "rotation": {"p": 0.2, "degrees": 30.0, "planes": None},
    "scaling": {"p": 0.2, "range": [0.7, 1.4]},
    "gamma": {"p": 0.3, "range": [0.7, 1.5], "invert_p": 0.1},
    "noise": {"p": 0.1, "std": [0.0, 0.1]},
    "brightness": {"p": 0.15, "range": [0.75, 1.25]},
    "contrast": {"p": 0.15, "range": [0.75, 1.25]},
    "mixup": {"p": 0.0, "alpha": 0.2},
}


@dataclass(frozen=True)
class AugmentParams:
    """Validated augmentation settings; a probability of 0 switches a transform off."""

    spatial_dims: int
    mirror_p: float = 0.0
    mirror_axes: tuple[int, ...] = ()
    rotation_p: float = 0.0
    rotation_degrees: float = 0.0
    rotation_planes: tuple[tuple[int, int], ...] = ()
    scaling_p: float = 0.0
    scaling_range: tuple[float, float] = (1.0, 1.0)
    gamma_p: float = 0.0
    gamma_range: tuple[float, float] = (1.0, 1.0)
    gamma_invert_p: float = 0.0
    noise_p: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.0)
    brightness_p: float = 0.0
    brightness_range: tuple[float, float] = (1.0, 1.0)
    contrast_p: float = 0.0
    contrast_range: tuple[float, float] = (1.0, 1.0)
    mixup_p: float = 0.0  # applied by the classification task, not by BatchAugment
    mixup_alpha: float = 0.2

    @property
    def active(self) -> bool:
        return any(
            p > 0
            for p in (
                self.mirror_p, self.rotation_p, self.scaling_p, self.gamma_p, self.noise_p,
                self.brightness_p, self.contrast_p,
            )
        )  # fmt: skip


def _prob(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
        raise InputError(f"{where}: expected a probability in [0, 1], got {v!r}")
    return float(v)


def _range(v: Any, where: str, low: float, strictly_positive: bool = True) -> tuple[float, float]:
    ok = isinstance(v, list | tuple) and len(v) == 2
    ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    ok = ok and v[0] <= v[1] and (v[0] > low if strictly_positive else v[0] >= low)
    if not ok:
        bound = f"> {low}" if strictly_positive else f">= {low}"
        raise InputError(f"{where}: expected [low, high] with low <= high and low {bound}, got {v!r}")
    return (float(v[0]), float(v[1]))


def _axes(v: Any, where: str, nd: int) -> tuple[int, ...]:
    ok = isinstance(v, list | tuple) and all(isinstance(a, int) and not isinstance(a, bool) for a in v)
    if not ok or any(not 0 <= a < nd for a in v) or len(set(v)) != len(v):
        raise InputError(f"{where}: expected distinct spatial axes in 0..{nd - 1}, got {v!r}")
    return tuple(int(a) for a in v)


def _planes(v: Any, where: str, nd: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, list | tuple):
        raise InputError(f"{where}: expected a list of axis pairs such as [[0, 1]], got {v!r}")
    out = []
    for i, pair in enumerate(v):
        axes = _axes(pair, f"{where}[{i}]", nd)
        if len(axes) != 2:
            raise InputError(f"{where}[{i}]: expected two distinct axes, got {pair!r}")
        out.append((axes[0], axes[1]))
    return tuple(out)


def parse_augmentation(
    cfg: Mapping[str, Any], spatial_dims: int, where: str = "augmentation"
) -> AugmentParams:
    """Validate the plan's ``augmentation`` section for patches with ``spatial_dims`` axes.

    Raises:
        InputError: an unknown transform or key (with "did you mean") or a bad value, naming ``where.key``.
    """
    if not isinstance(cfg, Mapping):
        raise InputError(f"{where}: expected a JSON object of transforms, got {cfg!r}")
    nd = spatial_dims
    kw: dict[str, Any] = {"spatial_dims": nd}
    for name, sub in cfg.items():
        path = f"{where}.{name}"
        if name not in DEFAULTS:
            raise InputError(
                f"{path}: unknown transform.{did_you_mean(name, list(DEFAULTS))} Accepted: {', '.join(DEFAULTS)}."
            )
        if not isinstance(sub, Mapping):
            raise InputError(f"{path}: expected an object such as {{'p': 0.2}}, got {sub!r}")
        for key in sub:
            if key not in DEFAULTS[name]:
                keys = list(DEFAULTS[name])
                raise InputError(
                    f"{path}.{key}: unknown key.{did_you_mean(str(key), keys)} Accepted: {', '.join(keys)}."
                )
        v = {**DEFAULTS[name], **sub}
        kw[f"{name}_p"] = _prob(v["p"], f"{path}.p")
        if name == "mirror":
            kw["mirror_axes"] = (
                tuple(range(nd)) if v["axes"] is None else _axes(v["axes"], f"{path}.axes", nd)
            )
        elif name == "rotation":
            deg = v["degrees"]
            if isinstance(deg, bool) or not isinstance(deg, int | float) or not 0 <= deg <= 180:
                raise InputError(f"{path}.degrees: expected a maximum angle in [0, 180], got {deg!r}")
            kw["rotation_degrees"] = float(deg)
            all_planes = [[a, b] for a in range(nd) for b in range(a + 1, nd)]
            kw["rotation_planes"] = _planes(
                v["planes"] if v["planes"] is not None else all_planes, f"{path}.planes", nd
            )
        elif name == "gamma":
            kw["gamma_range"] = _range(v["range"], f"{path}.range", 0.0)
            kw["gamma_invert_p"] = _prob(v["invert_p"], f"{path}.invert_p")
        elif name == "mixup":
            alpha = v["alpha"]
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
                raise InputError(f"{path}.alpha: expected a Beta parameter > 0 (e.g. 0.2), got {alpha!r}")
            kw["mixup_alpha"] = float(alpha)
        elif name == "noise":
            kw["noise_std"] = _range(v["std"], f"{path}.std", 0.0, strictly_positive=False)
        else:
            kw[f"{name}_range"] = _range(v["range"], f"{path}.range", 0.0)
    return AugmentParams(**kw)


class BatchAugment:
    """Apply an augmentation plan to ``{"image": (B, C, *S) float, "label": (B, 1, *S) int}`` batches.

    Args:
        params: an :class:`AugmentParams`, or the plan's ``augmentation`` section (validated here).
        spatial_dims: 2 or 3 (needed when ``params`` is a mapping).
    """

    def __init__(self, params: AugmentParams | Mapping[str, Any], spatial_dims: int | None = None) -> None:
        if not isinstance(params, AugmentParams):
            if spatial_dims is None:
                raise InputError("BatchAugment needs spatial_dims when given a plan section")
            params = parse_augmentation(params, spatial_dims)
        self.params = params

    def __repr__(self) -> str:
        return f"BatchAugment({self.params})"

    def __call__(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """A new batch dict with augmented ``image`` (and ``label``); other keys are passed through."""
        out = dict(batch)
        img = batch["image"].clone()
        lab = batch["label"].clone() if batch.get("label") is not None else None
        nd = img.ndim - 2
        if nd != self.params.spatial_dims:
            raise InputError(
                f"augmentation planned for {self.params.spatial_dims}D patches, got a {nd}D batch"
            )
        img, lab = self._spatial(img, lab, generator)
        img, lab = self._mirror(img, lab, generator)
        img = self._intensity(img, generator)
        out["image"] = img
        if lab is not None:
            out["label"] = lab
        return out

    # ---- spatial ---------------------------------------------------------------------------------------------
    def _spatial(
        self, img: torch.Tensor, lab: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch
        import torch.nn.functional as F

        p = self.params
        if p.rotation_p <= 0 and p.scaling_p <= 0:
            return img, lab
        b, nd = img.shape[0], img.ndim - 2
        do_rot = torch.rand(b, generator=gen) < p.rotation_p
        do_scale = torch.rand(b, generator=gen) < p.scaling_p
        angles = (
            torch.rand(b, len(p.rotation_planes), generator=gen, dtype=torch.float64) * 2 - 1
        ) * math.radians(p.rotation_degrees)
        lo, hi = p.scaling_range
        scales = lo + torch.rand(b, generator=gen, dtype=torch.float64) * (hi - lo)
        idx = torch.nonzero(do_rot | do_scale).flatten()
        if idx.numel() == 0:
            return img, lab
        n = idx.numel()
        mats = torch.eye(nd, dtype=torch.float64).repeat(n, 1, 1)
        for k, (a, c) in enumerate(p.rotation_planes):
            ang = torch.where(do_rot[idx], angles[idx, k], torch.zeros(n, dtype=torch.float64))
            rot = torch.eye(nd, dtype=torch.float64).repeat(n, 1, 1)
            rot[:, a, a], rot[:, a, c] = torch.cos(ang), -torch.sin(ang)
            rot[:, c, a], rot[:, c, c] = torch.sin(ang), torch.cos(ang)
            mats = rot @ mats
        mats = (
            mats * torch.where(do_scale[idx], scales[idx], torch.ones(n, dtype=torch.float64))[:, None, None]
        )
        # Sampling coordinates in voxels around the patch centre: x_in = M x_out. affine_grid works in
        # normalised coordinates (half-extent 1 along each axis, axes listed last-to-first), so conjugate.
        half = torch.tensor([s / 2 for s in img.shape[2:]], dtype=torch.float64)
        theta = mats * half[None, None, :] / half[None, :, None]
        theta = theta.flip(1).flip(2)
        theta = torch.cat([theta, torch.zeros(n, nd, 1, dtype=torch.float64)], dim=2).to(
            img.device, img.dtype
        )
        sel = idx.to(img.device)
        grid = _affine_grid(theta, img.shape[2:])
        img[sel] = F.grid_sample(img[sel], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if lab is not None:
            warped = F.grid_sample(
                lab[sel].to(grid.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False
            )
            lab[sel] = warped.round().to(lab.dtype)
        return img, lab

    def _mirror(
        self, img: torch.Tensor, lab: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        p = self.params
        if p.mirror_p <= 0:
            return img, lab
        flips = torch.rand(img.shape[0], len(p.mirror_axes), generator=gen) < p.mirror_p
        for i in range(img.shape[0]):  # one flip per sample over all its axes: cheaper than per axis
            dims = [1 + ax for k, ax in enumerate(p.mirror_axes) if flips[i, k]]
            if dims:
                img[i] = img[i].flip(dims)
                if lab is not None:
                    lab[i] = lab[i].flip(dims)
        return img, lab

    # ---- intensity -------------------------------------------------------------------------------------------
    def _draw(
        self, shape: tuple[int, ...], prob: float, rng: tuple[float, float], gen: torch.Generator
    ) -> Any:
        """Per-entry factors: uniform in ``rng`` with probability ``prob``, else 1 (and the mask)."""
        import torch

        apply = torch.rand(shape, generator=gen) < prob
        values = rng[0] + torch.rand(shape, generator=gen) * (rng[1] - rng[0])
        return torch.where(apply, values, torch.ones(shape)), apply

    def _intensity(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        import torch

        p = self.params
        b, c = img.shape[:2]
        nd = img.ndim - 2
        view = (b, c) + (1,) * nd
        dims = tuple(range(2, 2 + nd))
        dev = img.device
        if p.brightness_p > 0:
            factor, _ = self._draw((b, c), p.brightness_p, p.brightness_range, gen)
            img = img * factor.view(view).to(dev, img.dtype)
        if p.contrast_p > 0:
            factor, apply = self._draw((b, c), p.contrast_p, p.contrast_range, gen)
            if apply.any():
                mean = img.mean(dim=dims, keepdim=True)
                lo, hi = img.amin(dim=dims, keepdim=True), img.amax(dim=dims, keepdim=True)
                img = ((img - mean) * factor.view(view).to(dev, img.dtype) + mean).clamp(lo, hi)
        if p.gamma_p > 0:
            gamma, apply = self._draw((b, c), p.gamma_p, p.gamma_range, gen)
            invert = (torch.rand((b, c), generator=gen) < p.gamma_invert_p) & apply
            rows = torch.nonzero(apply.any(dim=1)).flatten()
            if rows.numel():  # only the samples that drew a gamma are touched
                sub = (rows.numel(), c) + (1,) * nd
                sign = torch.where(invert[rows], -1.0, 1.0).view(sub).to(dev, img.dtype)
                x = img[rows.to(dev)] * sign
                mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
                lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
                rng = (hi - lo).clamp_min(1e-7)
                y = ((x - lo) / rng).clamp(0, 1) ** gamma[rows].view(sub).to(dev, img.dtype) * rng + lo
                # keep mean and std, as nnU-Net does, so gamma changes contrast, not the intensity scale
                y = (y - y.mean(dim=dims, keepdim=True)) / y.std(dim=dims, keepdim=True).clamp_min(
                    1e-7
                ) * std + mean
                img = img.clone()
                img[rows.to(dev)] = torch.where(apply[rows].view(sub).to(dev), y * sign, x * sign)
        if p.noise_p > 0:
            apply = torch.rand(b, generator=gen) < p.noise_p
            sigma = p.noise_std[0] + torch.rand(b, generator=gen) * (p.noise_std[1] - p.noise_std[0])
            sel = torch.nonzero(apply).flatten()
            if sel.numel():
                noise = torch.randn((sel.numel(), *img.shape[1:]), generator=gen) * sigma[sel].view(
                    -1, *(1,) * (nd + 1)
                )
                img = img.clone()
                img[sel.to(dev)] += noise.to(dev, img.dtype)
        return img


def _affine_grid(theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.affine_grid(theta, size, align_corners=False)`` built by broadcasting, several times faster on CPU.

    Args:
        theta: ``(n, nd, nd + 1)`` in affine_grid's convention (grid components ordered x, y[, z] = last axis
            first).
        size: the spatial size ``(*S)`` in tensor order.
    """
    import torch

    n, nd = theta.shape[0], len(size)
    # normalised voxel-centre coordinates per axis, listed x (last tensor axis) first
    coords = [
        ((torch.arange(s, dtype=theta.dtype, device=theta.device) * 2 + 1) / s - 1)
        for s in reversed(list(size))
    ]
    shape = [n, *size]
    comps = []
    for i in range(nd):
        acc = theta[:, i, nd].view(n, *([1] * nd)).expand(shape).clone()
        for j, c in enumerate(coords):
            view = [1] * nd
            view[nd - 1 - j] = c.numel()
            acc += theta[:, i, j].view(n, *([1] * nd)) * c.view(1, *view)
        comps.append(acc)
    return torch.stack(comps, dim=-1)


def make_augment(cfg: Mapping[str, Any] | None, spatial_dims: int) -> BatchAugment | None:
    """A :class:`BatchAugment` for a plan's ``augmentation`` section, or None when every transform is off."""
    if not cfg:
        return None
    params = parse_augmentation(cfg, spatial_dims)
    return BatchAugment(params) if params.active else None
