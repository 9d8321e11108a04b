"""The valid-convolution U-Net and its shape arithmetic.

``UNet`` is imported lazily so that ``medseg.model.shapes`` works without torch.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "UNet":
        from medseg.model.unet import UNet

        return UNet
    raise AttributeError(name)
