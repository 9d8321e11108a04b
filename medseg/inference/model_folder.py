"""A model folder (a training run): ``plan.json``, ``model.pt`` (tensors only) and optional
``postprocessing.json``, loaded into a network in eval mode on its device.

Test-time augmentation is not the folder's to decide here: the command line reads the
pipeline's ``[infer] tta`` beside the model and passes it to each prediction.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import ModelError, PlanError
from medseg.preprocess.plan import Plan
from medseg.runtime import resolve_device


@dataclass
class LoadedModel:
    """A network in eval mode on its device, with the plan and postprocessing it came with."""

    model: nn.Module
    plan: Plan
    postprocessing: dict[str, Any] | None = None
    folder: Path | None = None


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    # DistributedDataParallel and torch.compile wrap the module and prefix every key
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _check_network(root: Path, plan: Plan, model: nn.Module) -> None:
    """``PlanError`` unless the network plan.json builds fits the plan's channels, classes
    and margin."""
    net = plan.network
    checks = {
        "spatial_dims": (net.get("spatial_dims"), plan.spatial_dims),
        "in_channels": (net.get("in_channels"), plan.in_channels),
        "out_channels": (net.get("out_channels"), plan.num_classes),
    }
    for key, (have, want) in checks.items():
        if have != want:
            raise PlanError(
                f"{root / 'plan.json'}: network {key} = {have} but the plan needs {want}"
            )
    if tuple(plan.margin) != (model.margin,) * plan.spatial_dims:  # type: ignore[attr-defined]
        raise PlanError(
            f"{root / 'plan.json'}: margin {tuple(plan.margin)} does not match the network's "
            f"{model.margin} voxels per side; regenerate the plan"  # type: ignore[attr-defined]
        )


def _read_weights(weights: Path, dev: torch.device, model: nn.Module) -> dict[str, Any]:
    """The state dict in ``weights`` (tensors only), checked against ``model``'s names and
    shapes; ``ModelError`` naming what is missing, unexpected or of another shape."""
    if not weights.is_file():
        raise ModelError(f"{weights}: weights not found; is training finished?")
    try:
        state = torch.load(weights, map_location=dev, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{weights}: refused, the file holds pickled objects or code, not plain tensors; "
            "save it with torch.save(model.state_dict(), path)"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/zip errors for bad files
        raise ModelError(f"{weights}: not a readable PyTorch weights file ({exc})") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelError(f"{weights}: expected a state_dict (names -> tensors)")
    state = _strip_prefixes(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if shape:
            parts.append(f"shape mismatch {shape[:3]}{' ...' if len(shape) > 3 else ''}")
        raise ModelError(
            f"{weights}: weights do not fit the network in plan.json: {'; '.join(parts)}"
        )
    return state


def load_model(folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Read ``plan.json``, ``model.pt`` (tensors only) and optional ``postprocessing.json``.

    ``model.pt`` is loaded with ``torch.load(weights_only=True)``: a checkpoint that needs
    arbitrary pickled code is refused. Raises ``PlanError`` / ``ModelError`` naming the file.
    """
    from medseg.model import UNet

    root = Path(folder)
    if not root.is_dir():
        raise ModelError(f"{root}: model folder not found; point --model to a training run")
    plan = Plan.load(root / "plan.json")
    dev = resolve_device(device)
    try:
        model: nn.Module = UNet(**plan.network)
    except (TypeError, ValueError) as exc:
        raise PlanError(
            f"{root / 'plan.json'}: network settings do not build a UNet ({exc})"
        ) from exc
    _check_network(root, plan, model)
    state = _read_weights(root / "model.pt", dev, model)
    model.load_state_dict(state)
    model.to(dev).eval()
    post = None
    post_path = root / "postprocessing.json"
    if post_path.is_file():
        try:
            post = json.loads(post_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{post_path}: not readable JSON ({exc}); delete or fix it") from exc
    return LoadedModel(model, plan, post, root)
