"""The valid-convolution U-Net: paper configuration, shapes, initialisation, layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medseg.model import UNet, shapes


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
