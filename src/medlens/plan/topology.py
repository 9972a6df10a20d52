"""Network topology from a patch size and spacing (nnU-Net's pooling rules, for MONAI's U-Net).

An axis is downsampled at a stage while its feature map is at least ``2 * min_edge`` voxels and its current
spacing is less than twice the finest current spacing: on anisotropic data the coarse axis waits until the
fine axes have been pooled to a comparable spacing. The patch must be divisible by the product of the strides
along each axis (the network's total stride).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Topology:
    """Strides per stage and axis, the total stride per axis, and the patch size rounded to it."""

    strides: tuple[tuple[int, ...], ...]
    divisor: tuple[int, ...]
    patch_size: tuple[int, ...]

    @property
    def num_pools(self) -> int:
        return len(self.strides)


def pool_topology(
    spacing: Sequence[float], patch_size: Sequence[int], min_edge: int = 4, max_pools: int = 5
) -> Topology:
    """The strides nnU-Net would choose for ``patch_size`` at ``spacing``, and the patch rounded down to them.

    Args:
        spacing: voxel spacing (mm) of the patch's axes.
        patch_size: wanted patch size (voxels).
        min_edge: smallest feature-map edge at the bottleneck.
        max_pools: at most this many downsampling stages.
    """
    nd = len(patch_size)
    size = [int(p) for p in patch_size]
    sp = [float(s) for s in spacing]
    strides: list[tuple[int, ...]] = []
    while len(strides) < max_pools:
        finest = min(sp)
        pool = [size[a] >= 2 * min_edge and sp[a] / finest < 2 for a in range(nd)]
        if not any(pool):
            break
        strides.append(tuple(2 if p else 1 for p in pool))
        for a in range(nd):
            if pool[a]:
                size[a] //= 2
                sp[a] *= 2
    divisor = tuple(math.prod(s[a] for s in strides) for a in range(nd))
    patch = tuple(max(d, int(p) // d * d) for p, d in zip(patch_size, divisor, strict=True))
    return Topology(tuple(strides), divisor, patch)


def features_per_stage(num_stages: int, base: int, maximum: int) -> list[int]:
    """Channels per stage: ``base`` doubling per stage, capped at ``maximum``."""
    return [min(maximum, base * 2**i) for i in range(num_stages)]


def unet_spec(topology: Topology, base: int, maximum: int, num_res_units: int) -> dict[str, Any]:
    """The ``network`` section for MONAI's UNet with this topology (one stride entry per stage)."""
    strides: list[Any] = [s[0] if len(set(s)) == 1 else list(s) for s in topology.strides]
    if not strides:  # a patch too small to pool: one stride-1 stage keeps MONAI's UNet well-formed
        strides = [1]
    return {
        "name": "unet",
        "channels": features_per_stage(len(strides) + 1, base, maximum),
        "strides": strides,
        "num_res_units": num_res_units,
        "norm": "instance",
        "dropout": 0.0,
    }
