"""The valid-convolution U-Net: paper configuration, shapes, initialisation, layers."""

from __future__ import annotations

import math
import weakref
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from medseg.model import UNet, shapes
from medseg.model.unet import fold_batch_norm


def test_paper_configuration_parameter_count_and_572_to_388() -> None:
    with torch.device("meta"):
        net = UNet(2, 1, 2, depth=4, base_channels=64, upsampling="transpose", norm="none")
        y = net(torch.empty(1, 1, 572, 572))
    assert sum(p.numel() for p in net.parameters()) == 31_030_658
    assert tuple(y.shape) == (1, 2, 388, 388)
    assert net.margin == 92
    assert net.output_shape((572, 572)) == (388, 388)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("upsampling", ["transpose", "interpolate"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_forward_shape_matches_output_shape(dims: int, upsampling: str, norm: str) -> None:
    net = UNet(dims, 2, 3, depth=2, base_channels=2, upsampling=upsampling, norm=norm).eval()
    size = (shapes.input_size(4, 2), shapes.input_size(8, 2), shapes.input_size(12, 2))[:dims]
    with torch.no_grad():
        y = net(torch.randn(2, 2, *size))
    assert tuple(y.shape) == (2, 3, *net.output_shape(size))
    assert net.output_shape(size) == (4, 8, 12)[:dims]


def test_he_initialisation_std() -> None:
    """Weights ~ N(0, 2/N), N = incoming connections (paper, section 3)."""
    torch.manual_seed(0)
    net = UNet(3, 1, 2, depth=2, base_channels=16, norm="none")
    conv = net.decode[0][0]  # 64 -> 32 channels, 3x3x3: N = 64 * 27
    assert isinstance(conv, nn.Conv3d)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 27)), rel=0.03)
    up = net.up[0].conv  # transposed 2x2x2, stride 2: each output sees 1 tap per input channel
    assert isinstance(up, nn.ConvTranspose3d)
    assert up.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert all(
        float(m.bias.detach().abs().max()) == 0
        for m in net.modules()
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and m.bias is not None
    )


def test_dropout_sits_at_end_of_contracting_path_and_is_off_in_eval() -> None:
    net = UNet(2, 1, 2, depth=2, base_channels=4, dropout=0.5)
    assert isinstance(net.dropout, nn.Dropout)
    x = torch.randn(1, 1, shapes.input_size(8, 2), shapes.input_size(8, 2))
    seen: list[torch.Tensor] = []
    net.dropout.register_forward_hook(lambda _m, a, _y: seen.append(a[0]))
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
    assert torch.equal(a, b)
    # the dropout input is the bottom block output: the deepest, widest feature map
    assert seen[0].shape[1] == 4 * 2**2
    net.train()
    with torch.no_grad():
        c = net(x)
    assert not torch.allclose(a, c)


def test_per_sample_norms_are_refused() -> None:
    with pytest.raises(ValueError, match="depend on the tile"):
        UNet(3, 1, 2, depth=2, base_channels=4, norm="instance")


def test_network_kwargs_rebuild_same_architecture() -> None:
    net = UNet(
        3,
        2,
        4,
        depth=3,
        base_channels=3,
        channel_multiplier=3,
        convs_per_level=1,
        upsampling="interpolate",
        norm="none",
        dropout=0.1,
    )
    again = UNet(**net.network)
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in again.state_dict().items()
    }
    assert again.margin == shapes.margin(3, 1)


@pytest.mark.parametrize("dims", [2, 3])
def test_fold_batch_norm_matches_eval_batch_norm(dims: int) -> None:
    from medseg.model.unet import fold_batch_norm

    torch.manual_seed(0)
    net = UNet(dims, 2, 3, depth=2, base_channels=4)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    net.eval()
    folded = fold_batch_norm(net)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in folded.modules())
    assert any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)) for m in net.modules())
    x = torch.randn(1, 2, *(shapes.input_size(8, 2),) * dims)
    with torch.no_grad():
        ref, got = net(x), folded(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(net.train())


def _random_bn_unet(dims: int, seed: int = 0, **kw: Any) -> UNet:
    """Random weights and non-trivial batch-norm statistics, eval mode."""
    torch.manual_seed(seed)
    net = UNet(dims, 2, 3, **kw)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _valid_input(out: tuple[int, ...], depth: int, convs: int) -> list[int]:
    return [shapes.input_size(shapes.valid_output_size(o, depth, convs), depth, convs) for o in out]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("slab", [2, 6, shapes.LEAN_SLAB_ROWS])
def test_lean_forward_equals_plain_forward(dims: int, channels_last: bool, slab: int) -> None:
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    # (depth, convs per level, output sizes): non-cubic, crops off-centre of the slabs
    for depth, convs, out in ((2, 2, (4, 12, 8)), (3, 1, (6, 14, 22)), (1, 3, (5, 9, 3))):
        net = _random_bn_unet(dims, depth=depth, base_channels=3, convs_per_level=convs)
        net.lean_slab_rows = slab
        x = torch.randn(2, 2, *_valid_input(out[:dims], depth, convs))
        if channels_last:
            x = x.contiguous(memory_format=fmt)
            net = net.to(memory_format=fmt)  # type: ignore[call-overload]
        with torch.inference_mode():
            ref = net(x)  # lean is off by default: the plain forward
            got = net.forward_lean(x)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-5
        assert got.is_contiguous(memory_format=fmt) == ref.is_contiguous(memory_format=fmt)


class _LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages alive between operations, from every op output (views count
    their storage once), released when the last tensor on the storage is garbage."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.peak = 0
        self.largest = 0

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key not in self.live:
            self.live[key] = [nbytes, 0]
            self.largest = max(self.largest, nbytes)
            self.peak = max(self.peak, sum(v[0] for v in self.live.values()))
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def test_lean_forward_lowers_peak_live_memory_as_estimated() -> None:
    """Deterministic peak of the activations alive between operations (storage bytes, the
    input included), not RSS: the lean forward never holds a full-resolution level-0 map,
    and its peak is what ``shapes.lean_peak_activation_elements`` predicts."""
    net = fold_batch_norm(_random_bn_unet(3, depth=2, base_channels=4))
    out = (12, 20, 16)
    x = torch.randn(1, 2, *_valid_input(out, 2, 2))
    level0 = 4 * 4 * math.prod(s - 4 for s in x.shape[2:])  # float32, 4 channels
    peaks = {}
    for lean in (False, True):
        forward = net.forward_lean if lean else net
        with torch.inference_mode():
            mode = _LiveBytes()
            with mode:
                mode.track(x)  # held by the caller throughout
                forward(x)
        peaks[lean] = mode.peak
        assert (mode.largest >= level0) is not lean
    estimate = 4 * shapes.lean_peak_activation_elements(out, **net.network)
    # the 2-channel input, held by the caller, is a third of the lean peak
    assert peaks[True] < 0.6 * peaks[False]
    assert peaks[True] <= estimate <= 1.25 * peaks[True]
