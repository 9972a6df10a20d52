"""Random training patches from preprocessed cases, with nnU-Net's foreground oversampling.

A batch is a pure function of ``(seed, index)``: batch ``i`` of the stream started at ``start`` equals batch
``i`` of the stream started at 0, so a resumed run sees exactly the data an uninterrupted one would have.

Each sample picks a case uniformly; a fraction ``oversample_foreground`` of the samples (exactly
``floor(B * p)`` per batch plus one more with probability ``frac(B * p)``, so the long-run fraction is ``p``
for any batch size) is centred on a voxel of a random foreground class present in that case, the rest are
uniform random crops. Where a case is smaller than the patch it is padded with zeros (image) and background
(label), the case placed at a random offset. A 2D patch size on 3D data samples a slice along ``slice_axis``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from medlens.errors import InputError

if TYPE_CHECKING:
    import torch


class PatchSource(Protocol):
    """What the sampler reads (:class:`medlens.plan.cache.Cache` is one)."""

    def data(self, case_id: str) -> np.ndarray:
        """``(C, *spatial)`` image data."""
        ...

    def seg(self, case_id: str) -> np.ndarray | None:
        """``(1, *spatial)`` class indices, or None."""
        ...

    def foreground(self, case_id: str) -> dict[int, np.ndarray]:
        """Class index -> ``(n, ndim)`` voxel locations."""
        ...


Augment = Callable[[Mapping[str, "torch.Tensor"], "torch.Generator"], dict[str, "torch.Tensor"]]


class PatchSampler:
    """An endless, reproducible stream of ``{"image": (B, C, *patch) float32, "label": (B, 1, *patch) int64}``.

    Args:
        cache: the preprocessed cases (a :class:`PatchSource`).
        case_ids: the training cases to draw from.
        patch_size: patch shape; one axis fewer than the data for 2D slices of 3D data.
        batch_size: samples per batch.
        oversample_foreground: fraction of samples centred on foreground.
        seed: default seed of :meth:`batches`.
        augment: applied to each batch with a ``torch.Generator`` derived from ``(seed, index)``, e.g. a
            :class:`medlens.data.augment.BatchAugment`.
        slice_axis: data axis to slice along for 2D patches of 3D data (default: the last).
    """

    def __init__(
        self,
        cache: PatchSource,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        batch_size: int,
        oversample_foreground: float = 0.33,
        seed: int = 0,
        augment: Augment | None = None,
        *,
        slice_axis: int | None = None,
    ) -> None:
        self.cache = cache
        self.case_ids = [str(c) for c in case_ids]
        if not self.case_ids:
            raise InputError("PatchSampler: no training cases given")
        if not patch_size or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in patch_size):
            raise InputError(f"PatchSampler: patch_size must be positive integers, got {list(patch_size)!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"PatchSampler: batch_size must be a positive integer, got {batch_size!r}")
        if not 0.0 <= oversample_foreground <= 1.0:
            raise InputError(
                f"PatchSampler: oversample_foreground must be in [0, 1], got {oversample_foreground!r}"
            )
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = batch_size
        self.oversample_foreground = float(oversample_foreground)
        self.seed = self._check_seed(seed)
        self.augment = augment
        data_nd = cache.data(self.case_ids[0]).ndim - 1
        if len(self.patch_size) == data_nd:
            self.slice_axis = None
        elif len(self.patch_size) == data_nd - 1:
            self.slice_axis = data_nd - 1 if slice_axis is None else int(slice_axis)
            if not 0 <= self.slice_axis < data_nd:
                raise InputError(f"PatchSampler: slice_axis {slice_axis} is not an axis of {data_nd}D data")
        else:
            raise InputError(
                f"PatchSampler: a {len(self.patch_size)}D patch size {self.patch_size} does not fit {data_nd}D data"
            )
        self.data_ndim = data_nd

    @staticmethod
    def _check_seed(seed: int) -> int:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise InputError(f"PatchSampler: seed must be a non-negative integer, got {seed!r}")
        return int(seed)

    def batches(self, seed: int | None = None, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``start, start + 1, ...`` of the stream for ``seed`` (default: the constructor's)."""
        s = self.seed if seed is None else self._check_seed(seed)
        index = int(start)
        while True:
            yield self.batch(s, index)
            index += 1

    def batch(self, seed: int, index: int) -> dict[str, torch.Tensor]:
        """Batch number ``index`` of the stream for ``seed``."""
        import torch

        rng = np.random.default_rng([int(seed), int(index)])
        b = self.batch_size
        expected = b * self.oversample_foreground
        n_fg = math.floor(expected) + int(rng.random() < expected - math.floor(expected))
        force = np.zeros(b, dtype=bool)
        force[rng.permutation(b)[:n_fg]] = True
        images, labels = [], []
        for i in range(b):
            case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
            img, lab = self.sample(case_id, bool(force[i]), rng)
            images.append(img)
            labels.append(lab)
        out = {"image": torch.from_numpy(np.stack(images)), "label": torch.from_numpy(np.stack(labels))}
        if self.augment is not None:  # on int16 labels: a quarter of the memory traffic of int64
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            out = self.augment(out, gen)
        out["label"] = out["label"].long()
        return out

    def sample(
        self, case_id: str, foreground: bool, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """One ``(C, *patch)`` float32 image patch and ``(1, *patch)`` label patch from ``case_id``."""
        data = self.cache.data(case_id)
        seg = self.cache.seg(case_id)
        shape = list(data.shape[1:])
        centre: np.ndarray | None = None
        if foreground:
            fg = self.cache.foreground(case_id)
            if fg:
                classes = sorted(fg)
                locs = fg[classes[int(rng.integers(len(classes)))]]
                centre = locs[int(rng.integers(len(locs)))]
        index: list[Any] = [slice(None)] * self.data_ndim
        axes = list(range(self.data_ndim))
        if self.slice_axis is not None:
            sa = self.slice_axis
            index[sa] = int(centre[sa]) if centre is not None else int(rng.integers(shape[sa]))
            axes.remove(sa)
        dst: list[slice] = []
        for ax, p in zip(axes, self.patch_size, strict=True):
            size = shape[ax]
            need = max(p - size, 0)
            lo, hi = -(need // 2), size + need // 2 + need % 2 - p
            if centre is not None:
                lb = int(np.clip(int(centre[ax]) - p // 2, lo, hi))
            else:
                lb = int(rng.integers(lo, hi + 1))
            src_lo, src_hi = max(lb, 0), min(lb + p, size)
            index[ax] = slice(src_lo, src_hi)
            dst.append(slice(src_lo - lb, src_hi - lb))
        img = np.zeros((data.shape[0], *self.patch_size), dtype=np.float32)
        img[(slice(None), *dst)] = data[(slice(None), *index)]
        lab = np.zeros((1, *self.patch_size), dtype=np.int16)
        if seg is not None:
            lab[(slice(None), *dst)] = seg[(slice(None), *index)]
        return img, lab
