"""Training: config and splits, the patch data (sampling, augmentation), losses, distributed
helpers, checkpoints and RNG state, validation, and the loop.

``train``, ``TrainConfig`` and ``TrainResult`` are re-exported lazily, so importing a numpy-only
module such as :mod:`medseg.training.sampling` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medseg.training.config import TrainConfig
    from medseg.training.loop import TrainResult, train

_EXPORTS = {
    "train": "medseg.training.loop",
    "TrainResult": "medseg.training.loop",
    "TrainConfig": "medseg.training.config",
}

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
