"""ONNX export of a U-Net with a free tile size, and the network it describes.

The exported graph is the inference network: batch norm folded into the convolutions
(:func:`medseg.model.unet.fold_batch_norm`), plain forward, float32, input ``image``
``(N, C, *spatial)`` and output ``logits`` ``(N, classes, *spatial - 2 * margin)``, with the
batch and every spatial size left free (``torch.export`` dynamic dimensions), so overlap-tile
inference can run it at any valid tile size (:mod:`medseg.model.shapes`). The plan's
``network`` settings, the margin and the medseg version are stored in the model's metadata
(``medseg.network``, ``medseg.margin``, ``medseg.version``), so a runtime can check that the
file belongs to the plan it is run with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from medseg.errors import ModelError
from medseg.model import shapes
from medseg.model.unet import UNet, fold_batch_norm

#: Input and output names of the exported graph.
INPUT_NAME, OUTPUT_NAME = "image", "logits"
#: ONNX operator set the graph is written in (onnxruntime 1.17+ runs it).
OPSET = 18


def _example(model: UNet) -> torch.Tensor:
    """An example tile with three different valid spatial sizes: equal example sizes would
    let the tracer tie the axes together."""
    step = 1 << model.depth
    base = shapes.min_output_size(model.depth, model.convs_per_level)
    sizes = [base + i * step + 2 * model.margin for i in range(model.spatial_dims)]
    return torch.zeros(2, model.in_channels, *sizes)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's notes that concern other models (torchvision operators it skips, its
    own deprecations) kept off the user's terminal; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: UNet, path: str | os.PathLike[str], *, opset: int = OPSET) -> Path:
    """Write ``model`` (eval mode) as ONNX to ``path`` (atomically); the path is returned.

    Raises ``ModelError`` for a model in training mode or one the exporter cannot trace.
    """
    import onnx

    from medseg import __version__
    from medseg.atomic import write_with

    if model.training:
        raise ModelError("export needs the model in eval mode (batch-norm statistics)")
    net = fold_batch_norm(model).to("cpu").float()
    net.lean = False
    auto = torch.export.Dim.AUTO
    dynamic = {"x": {a: auto for a in (0, *range(2, 2 + model.spatial_dims))}}
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                net,
                (_example(model),),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic,
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; none is the user's fault
        raise ModelError(f"ONNX export of the network failed: {exc}") from exc
    assert program is not None
    proto = program.model_proto
    meta = {
        "medseg.network": json.dumps(model.network, sort_keys=True),
        "medseg.margin": str(model.margin),
        "medseg.version": __version__,
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    out = Path(path)
    write_with(out, lambda tmp: onnx.save_model(proto, str(tmp)))
    return out


def onnx_network(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``network`` settings stored in an exported file (``ModelError`` if absent)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: ONNX file not found; write it with medseg export --onnx")
    try:
        proto = onnx.load_model(str(p), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have no common base
        raise ModelError(f"{p}: not a readable ONNX model ({type(exc).__name__})") from exc
    props = {e.key: e.value for e in proto.metadata_props}
    if "medseg.network" not in props:
        raise ModelError(f"{p}: no medseg network metadata; export it with medseg export --onnx")
    network: dict[str, Any] = json.loads(props["medseg.network"])
    return network
