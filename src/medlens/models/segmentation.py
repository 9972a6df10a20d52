"""Segmentation networks: MONAI's U-Net family behind the registry.

Every builder returns logits ``(B, out_channels, *spatial)`` at the input resolution; the input's spatial size
must be divisible by the network's total stride (the planner chooses patch sizes that are). Every builder takes a
``dropout`` probability so Monte-Carlo dropout can be switched on from the plan.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from medlens.models.registry import (
    check_choice,
    check_float,
    check_int,
    check_ints,
    check_per_axis,
    register_model,
)

if TYPE_CHECKING:
    from torch import nn

_ACTS: dict[str, Any] = {
    "prelu": "PRELU",
    "relu": ("RELU", {"inplace": True}),
    "leakyrelu": ("LEAKYRELU", {"negative_slope": 0.01, "inplace": True}),
}


def _norm(model: str, norm: str, channels: int, choices: tuple[str, ...]) -> Any:
    """Map a spec's norm name to MONAI's (name, args) form."""
    check_choice(model, "norm", norm, choices)
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "group":
        return ("group", {"num_groups": math.gcd(8, channels)})
    if norm == "none":
        return None
    return norm


def _flat(values: list[int | list[int]]) -> list[int]:
    return [v for item in values for v in (item if isinstance(item, list) else [item])]


@register_model("unet", task="segmentation", head=("model.2",))
def unet(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: tuple[int, ...] = (16, 32, 64, 128),
    strides: tuple[int, ...] = (2, 2, 2),
    num_res_units: int = 0,
    kernel_size: int = 3,
    up_kernel_size: int = 3,
    norm: str = "instance",
    act: str = "prelu",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI UNet; ``strides`` entries may be one integer per axis for anisotropic data."""
    from monai.networks.nets import UNet

    channels_ = check_ints("unet", "channels", channels)
    if kernel_size % 2 == 0 or up_kernel_size % 2 == 0:
        raise ValueError(
            f"kernel sizes must be odd, got kernel_size={kernel_size}, up_kernel_size={up_kernel_size}"
        )
    strides_ = check_per_axis("unet", "strides", strides, spatial_dims)
    if len(strides_) != len(channels_) - 1:
        raise ValueError(
            f"strides needs len(channels) - 1 = {len(channels_) - 1} entries, got {len(strides_)}"
        )
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels_,
        strides=strides_,  # type: ignore[arg-type]  # MONAI accepts one stride per axis too
        kernel_size=check_int("unet", "kernel_size", kernel_size),
        up_kernel_size=check_int("unet", "up_kernel_size", up_kernel_size),
        num_res_units=check_int("unet", "num_res_units", num_res_units, minimum=0),
        act=_ACTS[check_choice("unet", "act", act, tuple(_ACTS))],
        norm=_norm("unet", norm, channels_[0], ("instance", "batch", "none")),
        dropout=check_float("unet", "dropout", dropout, 0.0, 1.0),
    )


@register_model("basicunet", task="segmentation", head=("final_conv",))
def basicunet(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    features: tuple[int, ...] = (32, 32, 64, 128, 256, 32),
    norm: str = "instance",
    act: str = "leakyrelu",
    upsample: str = "deconv",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI BasicUNet: a fixed four-level U-Net with six feature widths."""
    from monai.networks.nets import BasicUNet

    act_ = check_choice("basicunet", "act", act, ("relu", "leakyrelu"))
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=check_ints("basicunet", "features", features, length=6),
        norm=_norm("basicunet", norm, 8, ("instance", "batch")),
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}) if act_ == "leakyrelu" else "relu",
        upsample=check_choice("basicunet", "upsample", upsample, ("deconv", "nontrainable", "pixelshuffle")),
        dropout=check_float("basicunet", "dropout", dropout, 0.0, 1.0),
    )


@register_model("dynunet", task="segmentation", head=("output_block",))
def dynunet(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, ...] = (3, 3, 3, 3, 3),
    strides: tuple[int, ...] = (1, 2, 2, 2, 2),
    filters: tuple[int, ...] = (32, 64, 128, 256, 320),
    norm: str = "instance",
    res_block: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI DynUNet, the nnU-Net architecture: one kernel size and stride per level (first stride 1)."""
    from monai.networks.nets import DynUNet

    kernels = check_per_axis("dynunet", "kernel_size", kernel_size, spatial_dims)
    strides_ = check_per_axis("dynunet", "strides", strides, spatial_dims)
    filters_ = check_ints("dynunet", "filters", filters)
    if any(k % 2 == 0 for k in _flat(kernels)):
        raise ValueError(f"kernel sizes must be odd, got {kernels}")
    if not len(kernels) == len(strides_) == len(filters_):
        raise ValueError(
            f"kernel_size, strides and filters need one entry per level, got {len(kernels)}, "
            f"{len(strides_)} and {len(filters_)}"
        )
    if not isinstance(res_block, bool):
        raise ValueError(f"res_block must be true or false, got {res_block!r}")
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides_,
        upsample_kernel_size=strides_[1:],
        filters=filters_,
        norm_name=_norm("dynunet", norm, filters_[0], ("instance", "batch")),
        res_block=res_block,
        dropout=check_float("dynunet", "dropout", dropout, 0.0, 1.0) or None,
    )


@register_model("segresnet", task="segmentation", head=("conv_final",))
def segresnet(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    init_filters: int = 8,
    blocks_down: tuple[int, ...] = (1, 2, 2, 4),
    blocks_up: tuple[int, ...] = (1, 1, 1),
    norm: str = "group",
    upsample: str = "nontrainable",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI SegResNet (residual encoder, light decoder); ``len(blocks_up) == len(blocks_down) - 1``."""
    from monai.networks.nets import SegResNet

    init = check_int("segresnet", "init_filters", init_filters)
    down = check_ints("segresnet", "blocks_down", blocks_down)
    up = check_ints("segresnet", "blocks_up", blocks_up, length=len(down) - 1)
    return SegResNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        init_filters=init,
        blocks_down=tuple(down),
        blocks_up=tuple(up),
        norm=_norm("segresnet", norm, init, ("group", "instance", "batch")),
        upsample_mode=check_choice(
            "segresnet", "upsample", upsample, ("nontrainable", "deconv", "pixelshuffle")
        ),
        dropout_prob=check_float("segresnet", "dropout", dropout, 0.0, 1.0) or None,
    )


@register_model("test_unet", task="segmentation", head=("model.2",))
def test_unet(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: tuple[int, ...] = (4, 8),
    dropout: float = 0.0,
) -> nn.Module:
    """A two-level MONAI UNet with a handful of channels, for fast tests (total stride 2)."""
    return unet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(check_ints("test_unet", "channels", channels, length=2)),
        strides=(2,),
        dropout=dropout,
    )
