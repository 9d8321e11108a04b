"""Inference engines: what runs the network on each tile.

The tiled forward pass (:mod:`medseg.inference.tiled`) needs a module with ``network`` (the
plan's settings), ``margin`` and a forward from a float32 tile batch to its logits. The
``torch`` engine is the U-Net itself; the ``onnxruntime`` engine is
:class:`OnnxRuntimeNetwork`, a module without parameters that hands each batch to an
onnxruntime ``InferenceSession`` of the graph :func:`medseg.model.export.export_onnx` wrote.
Tiles, their mirroring, stitching and restoring are the same code for both, so only the
arithmetic of the network itself differs (float32 rounding).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.errors import ModelError
from medseg.inference.model_folder import LoadedModel
from medseg.model import shapes

ENGINES = ("torch", "onnxruntime")
#: The ONNX file ``--engine onnxruntime`` looks for in a model folder by default.
ONNX_NAME = "model.onnx"
#: ``network`` settings that change the function the graph computes.
_FUNCTION_KEYS = (
    "spatial_dims",
    "in_channels",
    "out_channels",
    "depth",
    "base_channels",
    "channel_multiplier",
    "convs_per_level",
    "upsampling",
)


class OnnxRuntimeNetwork(nn.Module):
    """An exported U-Net run by onnxruntime on the CPU, with the module interface the tiles
    use. ``threads``: onnxruntime's intra-op threads (default torch's thread count, so both
    engines get the same cores)."""

    def __init__(
        self, path: str | os.PathLike[str], network: dict[str, Any], threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        super().__init__()
        self.network = dict(network)
        self.margin = shapes.margin(int(network["depth"]), int(network.get("convs_per_level", 2)))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unused initialisers are not the user's
        self._runtime = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_name = self._runtime.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        (out,) = self._runtime.run(None, {self.input_name: feed})
        return torch.from_numpy(out)


def check_onnx_network(path: Path, network: dict[str, Any], plan_file: Path | str) -> None:
    """``ModelError`` unless the network stored in ``path`` computes what ``network`` says."""
    from medseg.model.export import onnx_network

    stored = onnx_network(path)
    differ = [k for k in _FUNCTION_KEYS if stored.get(k) != network.get(k)]
    if differ:
        raise ModelError(
            f"{path}: exported from another network than {plan_file} ({', '.join(differ)} "
            "differ); export it again with medseg export"
        )


def with_engine(
    loaded: LoadedModel,
    engine: str,
    *,
    onnx_path: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """``loaded`` with its network run by ``engine`` (one of :data:`ENGINES`). For
    ``onnxruntime`` the graph is ``onnx_path`` (default ``model.onnx`` in the model folder),
    checked against the plan's network."""
    if engine not in ENGINES:
        raise ModelError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "torch":
        return loaded
    if onnx_path is None and loaded.folder is None:
        raise ModelError("--engine onnxruntime needs the ONNX file (--onnx)")
    path = Path(onnx_path) if onnx_path is not None else Path(loaded.folder or ".") / ONNX_NAME
    plan_file = (loaded.folder / "plan.json") if loaded.folder else "the plan"
    check_onnx_network(path, loaded.plan.network, plan_file)
    return replace(loaded, model=OnnxRuntimeNetwork(path, loaded.plan.network, threads))


def engine_agreement(
    model: nn.Module, path: str | os.PathLike[str], *, seed: int = 0
) -> tuple[float, tuple[int, ...]]:
    """Largest difference between the logits of ``model`` (torch, eval mode) and of its
    exported graph ``path`` (onnxruntime) on one random tile, as a fraction of the torch
    logits' range; and that tile's input size (a valid size unlike the traced example)."""
    network: dict[str, Any] = model.network  # type: ignore[assignment]
    depth, convs = int(network["depth"]), int(network.get("convs_per_level", 2))
    dims = int(network["spatial_dims"])
    step = 1 << depth
    sizes = tuple(
        shapes.input_size(shapes.min_output_size(depth, convs) + (2 + i) * step, depth, convs)
        for i in range(dims)
    )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, int(network["in_channels"]), *sizes, generator=gen)
    cpu = model.to("cpu")
    with torch.inference_mode():
        ref = cpu(x).numpy()
        got = OnnxRuntimeNetwork(path, network)(x).numpy()
    span = float(ref.max() - ref.min()) or 1.0
    return float(np.max(np.abs(got - ref))) / span, sizes
