"""Classification networks: MONAI ResNet, DenseNet121 and EfficientNet-B0 behind the registry (2D and 3D).

Every builder returns logits ``(B, out_channels)``, takes a ``dropout`` probability applied before the final
linear layer (DenseNet: inside the dense layers, as MONAI does), and never downloads weights.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from medlens.models.registry import check_choice, check_float, check_int, register_model


class DropoutLinear(nn.Linear):
    """A linear layer preceded by dropout, with the parameter names of a plain ``nn.Linear``.

    Keeping the names means weights saved with and without dropout load into each other.
    """

    def __init__(self, in_features: int, out_features: int, p: float) -> None:
        super().__init__(in_features, out_features)
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))


def _dropout_linear(fc: nn.Linear, p: float) -> DropoutLinear:
    """``fc`` preceded by dropout, keeping its parameter values."""
    layer = DropoutLinear(fc.in_features, fc.out_features, p)
    with torch.no_grad():
        layer.weight.copy_(fc.weight)
        layer.bias.copy_(fc.bias)
    return layer


def _resnet(
    depth: int,
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    widen_factor: float,
    conv1_kernel: int,
    conv1_stride: int,
    no_max_pool: bool,
    norm: str,
    dropout: float,
) -> nn.Module:
    from monai.networks.nets import resnet18, resnet34, resnet50

    name = f"resnet{depth}"
    factory = {18: resnet18, 34: resnet34, 50: resnet50}[depth]
    if not isinstance(no_max_pool, bool):
        raise ValueError(f"no_max_pool must be true or false, got {no_max_pool!r}")
    model = factory(
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        num_classes=out_channels,
        widen_factor=check_float(name, "widen_factor", widen_factor, 0.01, 16.0),
        conv1_t_size=check_int(name, "conv1_kernel", conv1_kernel),
        conv1_t_stride=check_int(name, "conv1_stride", conv1_stride),
        no_max_pool=no_max_pool,
        norm=check_choice(name, "norm", norm, ("batch", "instance")),
        pretrained=False,
    )
    p = check_float(name, "dropout", dropout, 0.0, 1.0)
    if p > 0 and isinstance(model.fc, nn.Linear):
        model.fc = _dropout_linear(model.fc, p)
    return model


@register_model("resnet18", task="classification", head=("fc",))
def resnet18(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    widen_factor: float = 1.0,
    conv1_kernel: int = 7,
    conv1_stride: int = 2,
    no_max_pool: bool = False,
    norm: str = "batch",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ResNet-18 (use ``conv1_stride: 1, no_max_pool: true`` for small images such as 28x28)."""
    return _resnet(
        18,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        widen_factor=widen_factor,
        conv1_kernel=conv1_kernel,
        conv1_stride=conv1_stride,
        no_max_pool=no_max_pool,
        norm=norm,
        dropout=dropout,
    )


@register_model("resnet34", task="classification", head=("fc",))
def resnet34(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    widen_factor: float = 1.0,
    conv1_kernel: int = 7,
    conv1_stride: int = 2,
    no_max_pool: bool = False,
    norm: str = "batch",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ResNet-34."""
    return _resnet(
        34,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        widen_factor=widen_factor,
        conv1_kernel=conv1_kernel,
        conv1_stride=conv1_stride,
        no_max_pool=no_max_pool,
        norm=norm,
        dropout=dropout,
    )


@register_model("resnet50", task="classification", head=("fc",))
def resnet50(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    widen_factor: float = 1.0,
    conv1_kernel: int = 7,
    conv1_stride: int = 2,
    no_max_pool: bool = False,
    norm: str = "batch",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ResNet-50 (bottleneck blocks)."""
    return _resnet(
        50,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        widen_factor=widen_factor,
        conv1_kernel=conv1_kernel,
        conv1_stride=conv1_stride,
        no_max_pool=no_max_pool,
        norm=norm,
        dropout=dropout,
    )


@register_model("densenet121", task="classification", head=("class_layers.out",))
def densenet121(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    init_features: int = 64,
    growth_rate: int = 32,
    norm: str = "batch",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI DenseNet-121; ``dropout`` is applied inside every dense layer."""
    from monai.networks.nets import DenseNet121

    return DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        init_features=check_int("densenet121", "init_features", init_features),
        growth_rate=check_int("densenet121", "growth_rate", growth_rate),
        norm=check_choice("densenet121", "norm", norm, ("batch", "instance")),
        dropout_prob=check_float("densenet121", "dropout", dropout, 0.0, 1.0),
        pretrained=False,
    )


@register_model("efficientnet-b0", task="classification", head=("_fc",))
def efficientnet_b0(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str = "batch",
    dropout: float = 0.2,
) -> nn.Module:
    """MONAI EfficientNet-B0 (random initialisation: no weights are downloaded)."""
    from monai.networks.nets import EfficientNetBN

    model = EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,
        progress=False,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=out_channels,
        norm=("batch", {"eps": 1e-3, "momentum": 0.01})
        if check_choice("efficientnet-b0", "norm", norm, ("batch", "instance")) == "batch"
        else ("instance", {"affine": True}),
    )
    model._dropout = nn.Dropout(check_float("efficientnet-b0", "dropout", dropout, 0.0, 1.0))
    return model


@register_model("test_classifier", task="classification", head=("fc",))
def test_classifier(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    width: int = 8,
    dropout: float = 0.0,
) -> nn.Module:
    """A two-convolution classifier with a few hundred parameters, for fast tests."""
    w = check_int("test_classifier", "width", width)
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
    pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", conv(in_channels, w, 3, padding=1)),
        ("norm1", norm(w, affine=True)),
        ("act1", nn.ReLU(inplace=True)),
        ("conv2", conv(w, 2 * w, 3, stride=2, padding=1)),
        ("norm2", norm(2 * w, affine=True)),
        ("act2", nn.ReLU(inplace=True)),
        ("pool", pool(1)),
        ("flatten", nn.Flatten()),
        (
            "fc",
            DropoutLinear(2 * w, out_channels, check_float("test_classifier", "dropout", dropout, 0.0, 1.0)),
        ),
    ]
    return nn.Sequential(OrderedDict(layers))
