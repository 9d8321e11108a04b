"""Fake networks, plans, model folders and the CLI runner the inference tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from medseg.inference.model_folder import LoadedModel
from medseg.model import UNet, shapes
from medseg.preprocess.plan import ChannelPlan, Plan
from tests.conftest import run_cli as run_cli  # the shared CLI runner


class CentreCrop(nn.Module):
    """Fake valid network: output = input cropped by the margin (what a U-Net of this depth
    would see at the centre). Any misplaced or missing tile changes the result."""

    def __init__(self, dims: int, channels: int, depth: int, convs: int = 2) -> None:
        super().__init__()
        self.margin = shapes.margin(depth, convs)
        self.network = {
            "spatial_dims": dims,
            "in_channels": channels,
            "out_channels": channels,
            "depth": depth,
            "convs_per_level": convs,
            "base_channels": 1,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        return x[(slice(None), slice(None), *[slice(m, s - m) for s in x.shape[2:]])]


def random_unet(
    dims: int, cin: int, cout: int, depth: int, base: int, seed: int = 0, **kw: Any
) -> UNet:
    """A randomly initialised U-Net in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    net = UNet(dims, cin, cout, depth=depth, base_channels=base, **kw)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def whole_volume_logits(
    net: nn.Module, image: np.ndarray, flips: list[tuple[int, ...]]
) -> np.ndarray:
    """Independent reference: mirror-pad the whole image once (numpy) to the smallest valid
    size and run the network once per mirroring, averaging."""
    depth, convs = net.network["depth"], net.network["convs_per_level"]
    m = shapes.margin(depth, convs)
    spatial = image.shape[1:]
    full = [shapes.valid_output_size(n, depth, convs) for n in spatial]
    pad = [(0, 0)] + [(m, m + f - n) for n, f in zip(spatial, full, strict=True)]
    x = torch.from_numpy(np.pad(image, pad, mode="reflect"))[None]
    acc = torch.zeros(1, net.network["out_channels"], *full)
    with torch.no_grad():
        for axes in flips:
            d = [2 + a for a in axes]
            y = net(torch.flip(x, d)) if d else net(x)
            acc += torch.flip(y, d) if d else y
    out = (acc / len(flips))[0].numpy()
    return out[(slice(None), *[slice(0, n) for n in spatial])]


class Threshold(nn.Module):
    """Fake valid network: logits ``[t - x, x - t]`` of the centre-cropped first channel, so
    its labels are "intensity above t" at exactly the voxel it is asked about."""

    def __init__(self, dims: int, channels: int, t: float, depth: int = 2) -> None:
        super().__init__()
        self.t = t
        self.margin = shapes.margin(depth, 2)
        self.network = {
            "spatial_dims": dims,
            "in_channels": channels,
            "out_channels": 2,
            "depth": depth,
            "convs_per_level": 2,
            "base_channels": 1,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        c = x[(slice(None), slice(0, 1), *[slice(m, s - m) for s in x.shape[2:]])]
        return torch.cat([self.t - c, c - self.t], dim=1)


class Bands(nn.Module):
    """Fake valid network of three classes: 0 below ``low``, 1 between, 2 above ``high`` (first
    channel, centre-cropped), by logits ``[low - x, min(x - low, high - x), x - high]`` times
    ``scale``: its labels, and its softmax probabilities, are known at every voxel."""

    def __init__(self, dims: int, low: float, high: float, scale: float = 1.0) -> None:
        super().__init__()
        self.low, self.high, self.scale = low, high, scale
        self.margin = shapes.margin(2, 2)
        self.network = {
            "spatial_dims": dims,
            "in_channels": 1,
            "out_channels": 3,
            "depth": 2,
            "convs_per_level": 2,
            "base_channels": 1,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        c = x[(slice(None), slice(0, 1), *[slice(m, s - m) for s in x.shape[2:]])]
        mid = torch.minimum(c - self.low, self.high - c)
        return self.scale * torch.cat([self.low - c, mid, c - self.high], dim=1)


def bands_logits(x: np.ndarray, low: float, high: float, scale: float = 1.0) -> np.ndarray:
    """The logits :class:`Bands` gives intensities ``x``, classes on a new first axis (numpy)."""
    return scale * np.stack([low - x, np.minimum(x - low, high - x), x - high])


def make_plan(
    *,
    dims: int = 3,
    channels: int = 1,
    label_values: tuple[int, ...] = (0, 1),
    orientation: tuple[str, str, str] | None = None,
    target_spacing: tuple[float, float, float] | None = None,
    crop: bool = False,
    depth: int = 2,
    base: int = 2,
) -> Plan:
    """A plan of channels without normalisation for the fake networks and small U-Nets."""
    network = {
        "spatial_dims": dims,
        "in_channels": channels,
        "out_channels": len(label_values),
        "depth": depth,
        "base_channels": base,
        "channel_multiplier": 2,
        "convs_per_level": 2,
        "upsampling": "transpose",
        "norm": "batch",
        "dropout": 0.0,
    }
    return Plan(
        spatial_dims=dims,
        channels=[ChannelPlan(f"ch{i}", "other", "none") for i in range(channels)],
        label_values=list(label_values),
        class_names=[str(v) for v in label_values],
        network=network,
        patch_output_size=(shapes.min_output_size(depth),) * dims,
        tile_output_size=(shapes.min_output_size(depth),) * dims,
        margin=(shapes.margin(depth),) * dims,
        orientation=orientation,
        target_spacing=target_spacing,
        crop_to_nonzero=crop,
    )


def threshold_loaded(plan: Plan, t: float, post: dict | None = None) -> LoadedModel:
    """The :class:`Threshold` network loaded with ``plan`` (and postprocessing ``post``)."""
    return LoadedModel(Threshold(plan.spatial_dims, plan.in_channels, t), plan, post)


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Voxels within one voxel (26-neighbourhood) of the mask's boundary."""
    st = np.ones((3,) * mask.ndim, bool)
    return ndimage.binary_dilation(mask, st) & ~ndimage.binary_erosion(mask, st)


def model_folder(tmp_path: Path, plan: Plan, seed: int = 0) -> tuple[Path, UNet]:
    """``tmp_path/run`` as training writes it: ``plan.json`` and a random U-Net's weights."""
    folder = tmp_path / "run"
    folder.mkdir()
    plan.save(folder / "plan.json")
    net = random_unet(
        plan.spatial_dims,
        cin=plan.in_channels,
        cout=plan.num_classes,
        depth=plan.network["depth"],
        base=plan.network["base_channels"],
        seed=seed,
    )
    torch.save(net.state_dict(), folder / "model.pt")
    return folder, net


class Evil:
    """Pickles to code that prints a marker when unpickled: what a weights loader must refuse."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("EXECUTED-PICKLED-CODE",))
