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
        #: tiles may run through :meth:`forward_lean` (set on the copy that
        #: ``medseg.inference.tiled.inference_model`` makes; ``tile_layout`` there decides)
        self.lean = False
        #: block-output columns (last spatial axis) per slab in :meth:`forward_lean`
        self.lean_slab_rows = shapes.LEAN_SLAB_ROWS
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

    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as the plain forward in eval mode, with less memory alive:
        for inference only (call it under ``torch.inference_mode()`` or ``no_grad``).

        Valid convolutions make a tile's top-level maps the largest tensors of the pass
        (``~(output + 2 * margin)^3`` voxels times the base width), yet the decoder reads only
        the centre crop of each skip (:func:`medseg.model.shapes.skip_crops`, known from the
        input size). So every encoder block runs slab by slab along the last spatial axis
        (block-output columns ``[r0, r1)`` need input columns ``[r0, r1 + 2 *
        convs_per_level)``; even bounds keep each 2x2 pooling inside one slab,
        :func:`shapes.slab_bounds`), and
        each slab's pooled rows and the rows of it inside the skip's crop are copied into
        preallocated tensors: the full-resolution block output is never materialised and
        no skip is kept whole. The bottom and the decoder run as in the plain forward,
        dropping every intermediate as soon as the next layer has consumed it. Each output
        voxel goes through the same convolutions of the same inputs, so results equal the
        plain forward to float32 rounding of the convolution backend. The memory format of
        the block outputs (channels-last or not) is kept. Memory estimate:
        :func:`medseg.model.shapes.lean_peak_activation_elements`.

        Why the last axis: PyTorch sends a CPU convolution to oneDNN only when
        ``N * C * D * H`` (the sizes before the last axis) exceeds 20480 (ATen's
        ``ConvParams::use_mkldnn``), else to a native kernel that is several times slower;
        slabs along the first axis fell below it (measured 6x slower at level 0), slabs
        along the last keep it.
        """
        crops = shapes.skip_crops(tuple(x.shape[2:]), self.depth, self.convs_per_level)
        skips: list[torch.Tensor] = []
        for block, crop in zip(self.down, crops, strict=True):
            x, skip = self._lean_level(block, x, crop)
            skips.append(skip)
        for layer in self.bottom:
            x = layer(x)
        x = self.dropout(x)
        for up, block in zip(self.up, self.decode, strict=True):
            x = torch.cat([skips.pop(), up(x)], dim=1)
            for layer in block.children():  # rebinding x frees each input once consumed
                x = layer(x)
        return self.head(x)

    def _lean_level(
        self, block: nn.Module, x: torch.Tensor, crop: shapes.SkipCrop
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One encoder level slab by slab: ``(pooled block output, cropped skip)``."""
        halo = 2 * self.convs_per_level
        cols = x.shape[-1] - halo  # block-output size along the slab (last) axis
        bounds = shapes.slab_bounds(cols, self.lean_slab_rows)
        keep = [slice(o, o + s) for o, s in zip(crop.offset, crop.size, strict=True)]
        c0, c1 = keep[-1].start, keep[-1].stop
        lead = (slice(None), slice(None))
        pooled: torch.Tensor | None = None
        skip: torch.Tensor | None = None
        for r0, r1 in bounds:
            y = x[..., r0 : r1 + halo]
            for layer in block.children():
                y = layer(y)
            p = self.pool(y)
            if skip is None:
                opts: dict[str, Any] = {
                    "dtype": y.dtype,
                    "device": y.device,
                    "memory_format": _memory_format(y),
                }
                skip = torch.empty((*y.shape[:2], *crop.size), **opts)
                if len(bounds) > 1:
                    pooled = torch.empty((*p.shape[:-1], cols // 2), **opts)
            if pooled is None or len(bounds) == 1:
                pooled = p
            else:
                pooled[..., r0 // 2 : r1 // 2] = p
            del p
            a, b = max(r0, c0), min(r1, c1)
            if a < b:
                skip[..., a - c0 : b - c0] = y[(*lead, *keep[:-1], slice(a - r0, b - r0))]
            del y
        assert pooled is not None and skip is not None
        return pooled, skip


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last memory format of 2D (NHWC) or 3D (NDHWC) activations."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """Channels-last when ``t`` is stored that way (and not also plainly contiguous)."""
    if t.dim() in (4, 5):
        cl = channels_last_format(t.dim() - 2)
        if t.is_contiguous(memory_format=cl) and not t.is_contiguous():
            return cl
    return torch.contiguous_format


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
