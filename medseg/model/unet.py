"""The valid-convolution U-Net of Ronneberger et al. (2015), in 2D and 3D.

Unpadded 3x3(x3) convolutions with ReLU, 2x2(x2) max pooling, upsampling by a 2x2 transposed
convolution (or nearest-neighbour doubling and a 1x1 convolution) that halves the channels,
crop-and-concatenate skips, a final 1x1 convolution, dropout at the end of the contracting
path, He initialisation (normal, std ``sqrt(2 / N)`` with ``N`` incoming connections).

Normalisation is batch norm or none. Per-sample normalisations (instance, group, layer norm)
are deliberately not offered: their statistics are computed over the whole input tile, so
the output at a voxel would depend on where the tile boundaries fall and overlap-tile
inference could no longer reproduce the whole-volume forward pass. Batch norm in eval mode is
a fixed per-channel affine map and keeps every voxel's output a function of its receptive
field only. For the same reason "interpolate" upsampling is nearest-neighbour, not linear:
linear interpolation clamps at the tile border.

Tensors are ``(N, C, I, J)`` (2D) or ``(N, C, I, J, K)`` (3D).
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
from torch import nn

from medseg.model import shapes

UPSAMPLING = ("transpose", "interpolate")
NORMS = ("batch", "none")


def _conv(dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


class _Block(nn.Sequential):
    """``convs`` unpadded 3x3(x3) convolutions, each followed by optional batch norm and ReLU."""

    def __init__(self, dims: int, cin: int, cout: int, convs: int, norm: str) -> None:
        layers: list[nn.Module] = []
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        for i in range(convs):
            layers.append(_conv(dims)(cin if i == 0 else cout, cout, 3, bias=norm == "none"))
            if norm == "batch":
                layers.append(bn(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _Up(nn.Module):
    """Double the size and halve the channels: 2x2 transposed conv, or nearest + 1x1 conv."""

    def __init__(self, dims: int, cin: int, cout: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            tconv = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
            self.conv: nn.Module = tconv(cin, cout, 2, stride=2)
        else:
            self.conv = _conv(dims)(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "interpolate":
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


def _center_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    idx: list[slice] = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], size, strict=True):
        off = (have - want) // 2
        idx.append(slice(off, off + want))
    return x[tuple(idx)]


class UNet(nn.Module):
    """Valid-convolution U-Net; ``output = input - 2 * margin`` per spatial axis.

    The paper's network is ``UNet(2, 1, 2, depth=4, base_channels=64)`` (31,030,658
    parameters, 572 -> 388). Keyword arguments equal ``plan.network``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        depth: int = 4,
        base_channels: int = 64,
        channel_multiplier: int = 2,
        convs_per_level: int = 2,
        upsampling: str = "transpose",
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
        if norm not in NORMS:
            raise ValueError(
                f"norm must be one of {NORMS}, got {norm!r} (per-sample norms would make "
                "the output depend on the tile)"
            )
        if depth < 1 or base_channels < 1 or channel_multiplier < 1 or convs_per_level < 1:
            raise ValueError(
                "depth, base_channels, channel_multiplier, convs_per_level must be >= 1"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        #: the constructor's keyword arguments, as stored in ``plan.network``
        self.network: dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "depth": depth,
            "base_channels": base_channels,
            "channel_multiplier": channel_multiplier,
            "convs_per_level": convs_per_level,
            "upsampling": upsampling,
            "norm": norm,
            "dropout": dropout,
        }
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.convs_per_level = convs_per_level
        self.margin = shapes.margin(depth, convs_per_level)
        widths = shapes.channel_widths(depth, base_channels, channel_multiplier)
        self.down = nn.ModuleList(
            _Block(
                spatial_dims,
                in_channels if i == 0 else widths[i - 1],
                widths[i],
                convs_per_level,
                norm,
            )
            for i in range(depth)
        )
        self.bottom = _Block(spatial_dims, widths[depth - 1], widths[depth], convs_per_level, norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList(
            _Up(spatial_dims, widths[i + 1], widths[i], upsampling) for i in reversed(range(depth))
        )
        self.decode = nn.ModuleList(
            _Block(spatial_dims, 2 * widths[i], widths[i], convs_per_level, norm)
            for i in reversed(range(depth))
        )
        self.head = _conv(spatial_dims)(widths[0], out_channels, 1)
        self.pool = nn.MaxPool2d(2) if spatial_dims == 2 else nn.MaxPool3d(2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation: weights ~ N(0, 2 / N), N = incoming connections; biases 0."""
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.Conv3d)):
                fan_in = mod.in_channels * math.prod(mod.kernel_size)
            elif isinstance(mod, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                # stride == kernel: each output voxel sees one tap of every input channel
                fan_in = mod.in_channels
            else:
                continue
            nn.init.normal_(mod.weight, 0.0, math.sqrt(2.0 / fan_in))
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial output shape for a spatial input shape; ``ValueError`` if invalid."""
        if len(input_shape) != self.spatial_dims:
            raise ValueError(f"expected {self.spatial_dims} spatial sizes, got {input_shape}")
        return tuple(shapes.output_size(s, self.depth, self.convs_per_level) for s in input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottom(x))
        for up, block in zip(self.up, self.decode, strict=True):
            x = up(x)
            skip = _center_crop(skips.pop(), tuple(x.shape[2:]))
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)


def fold_batch_norm(model: UNet) -> UNet:
    """An inference copy of ``model`` with every eval-mode batch norm folded into the
    convolution before it (``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma /
    sqrt(var + eps) + beta``), so a block is convolution + ReLU and skips one full pass over
    its activations. The same per-voxel affine map as batch norm in eval mode, so tiling
    stays exact; results differ from ``model`` only by float32 rounding (about 1e-6
    relative). ``model`` is left untouched; ``ValueError`` if it is in training mode.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batch_norm needs a model in eval mode (batch-norm statistics)")
    folded = copy.deepcopy(model)
    for block in itertools.chain(folded.down, [folded.bottom], folded.decode):
        layers = list(block.children())
        out: list[nn.Module] = []
        for layer in layers:
            if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm3d)) and out:
                conv = out.pop()
                assert isinstance(conv, (nn.Conv2d, nn.Conv3d))
                out.append(fuse_conv_bn_eval(conv, layer))
            else:
                out.append(layer)
        for name in list(block._modules):
            del block._modules[name]
        for i, layer in enumerate(out):
            block.add_module(str(i), layer)
    return folded.eval()
