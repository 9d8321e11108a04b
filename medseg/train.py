"""Training: patches from the preprocessed cache, validation by exact overlap-tile inference of
whole cases, atomic checkpoints, deterministic resume, DistributedDataParallel.

The recipe follows nnU-Net (Isensee et al. 2021) where the U-Net paper leaves it open: SGD with
Nesterov momentum 0.99 and a poly learning-rate schedule ``lr0 (1 - progress)^0.9`` (or AdamW),
gradient-norm clipping at 12, foreground oversampling of 1/3 of each batch, a fixed number of
iterations per epoch. Validation runs ``medseg.infer.predict_logits`` on every validation case
(the same tiling inference uses, not a patch estimate) and reports Dice per class.

Reproducibility: every batch is drawn from its own generator ``(seed, rank, step)`` (see
``medseg.sampling``), so a checkpoint's step counter is the whole sampler state and a batch
does not depend on which DataLoader worker made it. In deterministic mode, 2 epochs + resume +
2 epochs give the same weights as 4 epochs in one go.

Run folder (``--out``): ``pipeline.toml`` (copy), ``plan.json``, ``model.pt`` (plain state dict,
``torch.load(weights_only=True)``), ``checkpoint_last.pt`` and ``checkpoint_best.pt``,
``train_log.csv``, ``training.json``, ``postprocessing.json``. Everything is written by rank 0
through ``medseg.atomic``.
"""

from __future__ import annotations

import csv
import io
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from medseg import atomic, heap
from medseg.augment import AugmentConfig, augment_intensity, draw_spatial, extract_patch
from medseg.config import Pipeline
from medseg.errors import ModelError, PlanError
from medseg.losses import SegmentationLoss
from medseg.preprocess.plan import Plan
from medseg.runtime import bf16_autocast
from medseg.sampling import SamplingConfig, batch_rng, foreground_slots, output_box

SPLITS_FILE = "splits.json"
CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"


# -- configuration ------------------------------------------------------------------------------
#: ``[train]`` options that are on/off switches: a quoted "false" would otherwise read as true
_SWITCHES = (
    "include_background", "batch_dice", "region_dice", "deterministic", "amp", "tensorboard",
    "postprocess",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """``[train]`` options of a pipeline TOML (defaults: nnU-Net's where it has one).

    ``time_budget_minutes`` bounds the whole training (all resumed runs together): the poly
    schedule then follows whichever of steps and time runs out first, and training stops early
    enough to leave time for the final validation. ``region_dice`` takes the Dice terms of
    the loss over the plan's regions (the manifest's ``regions``) instead of single classes.
    ``amp`` trains under bf16 autocast where :func:`bf16_autocast` finds native bf16.
    """

    epochs: int = 50
    iterations_per_epoch: int = 250
    batch_size: int = 2
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    loss: str = "dice_ce"
    include_background: bool = True
    batch_dice: bool = False
    region_dice: bool = False
    class_weights: Any = None
    foreground_fraction: float = 1.0 / 3.0
    augment: dict[str, Any] = field(default_factory=dict)
    val_every: int = 1
    val_tile_size: Any = None
    workers: int = 2
    seed: int = 12345
    n_folds: int = 5
    fold: Any = 0
    time_budget_minutes: float | None = None
    deterministic: bool = False
    amp: bool = True
    select: str = "best"
    tensorboard: bool = False
    postprocess: bool = True
    postprocess_metric: str = "dice"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise PlanError(f"[train] optimizer {self.optimizer!r} must be 'sgd' or 'adamw'")
        if self.select not in ("best", "last"):
            raise PlanError(f"[train] select {self.select!r} must be 'best' or 'last'")
        for name in ("epochs", "iterations_per_epoch", "batch_size", "val_every"):
            if int(getattr(self, name)) < 1:
                raise PlanError(f"[train] {name} must be >= 1")
        if self.workers < 0:
            raise PlanError("[train] workers must be >= 0")
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise PlanError(
                    f"[train] {name} = {getattr(self, name)!r} must be true or false (a TOML "
                    "boolean, unquoted)"
                )
        if self.postprocess_metric not in ("dice", "rand"):
            raise PlanError(
                f"[train] postprocess_metric {self.postprocess_metric!r} must be 'dice' or "
                "'rand' (1 - adapted Rand error of the components of each class)"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, **overrides: Any) -> TrainConfig:
        """From a ``[train]`` table plus command-line overrides (None values are ignored)."""
        kw = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(kw) - known
        if unknown:
            raise PlanError(f"[train]: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        kw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**kw)
        except TypeError as exc:
            raise PlanError(f"[train]: {exc}") from exc

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 1e-2 if self.optimizer == "sgd" else 3e-4


# -- folds --------------------------------------------------------------------------------------
def make_splits(case_ids: Sequence[str], n_folds: int = 5, seed: int = 12345) -> list[dict]:
    """Seeded k-fold split of sorted case ids: ``[{"train": [...], "val": [...]}, ...]``.

    ``n_folds`` shrinks to the number of cases when there are fewer.
    """
    ids = sorted(case_ids)
    k = min(n_folds, len(ids))
    if k < 2:
        return []
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = [sorted(ids[i] for i in order[f::k]) for f in range(k)]
    return [{"train": sorted(set(ids) - set(val)), "val": val} for val in folds]


def load_or_create_splits(
    prep_dir: Path, case_ids: Sequence[str], n_folds: int, seed: int, write: bool = True
) -> list[dict]:
    """The fold split saved once in ``PREP/splits.json`` (created on first use)."""
    path = Path(prep_dir) / SPLITS_FILE
    if path.is_file():
        import json

        try:
            splits = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"{path}: unreadable ({exc}); delete it to draw a new split") from exc
        known = {c for s in splits for c in s.get("val", [])}
        missing = sorted(set(case_ids) - known)
        if missing:
            raise PlanError(
                f"{path}: cases {missing[:5]} are in no fold (the cache changed); "
                "delete splits.json to draw a new split"
            )
        return list(splits)
    splits = make_splits(case_ids, n_folds, seed)
    if write:
        atomic.write_json(path, splits)
    return splits


def fold_cases(
    splits: list[dict], fold: int | str, case_ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Training and validation case ids of ``fold`` (``"all"``: everything, no validation)."""
    if str(fold) == "all":
        return sorted(case_ids), []
    if str(fold) == "manifest":
        raise PlanError("--fold manifest needs the pipeline's manifest; use train()")
    try:
        k = int(fold)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"--fold {fold!r} must be an integer or 'all'") from exc
    if not splits:
        raise PlanError(
            f"--fold {k}: only {len(case_ids)} case(s) in the cache, too few for folds; "
            "use --fold all"
        )
    if not 0 <= k < len(splits):
        raise PlanError(f"--fold {k} out of range: the split has {len(splits)} folds (0..)")
    return list(splits[k]["train"]), list(splits[k]["val"])


def manifest_split(pipeline: Pipeline, case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--fold manifest``: the manifest's own ``split`` field ("val"/"validation" validate,
    "test" cases are left out, everything else trains)."""
    from medseg.manifest import load_manifest

    if pipeline.manifest is None:
        raise PlanError(f"{pipeline.path}: --fold manifest needs a manifest in the pipeline")
    split = {c.case_id: (c.split or "train") for c in load_manifest(pipeline.manifest).cases}
    val = sorted(c for c in case_ids if split.get(c) in ("val", "validation"))
    train = sorted(
        c for c in case_ids if split.get(c, "train") not in ("val", "validation", "test")
    )
    if not val or not train:
        raise PlanError(
            f"{pipeline.manifest}: --fold manifest needs cases with split 'train' and 'val'"
        )
    return train, val


# -- data -----------------------------------------------------------------------------------------
class PatchBatches(Dataset):
    """Item ``step`` is the whole batch of that step on this rank (numpy -> torch tensors).

    Cases are opened lazily (memory-mapped) in whichever process draws from them.
    """

    def __init__(
        self,
        prep_dir: Path,
        case_ids: Sequence[str],
        sampling: SamplingConfig,
        augment: AugmentConfig,
        batch_size: int,
        seed: int,
        rank: int = 0,
        with_weights: bool = False,
    ) -> None:
        self.prep_dir = Path(prep_dir)
        self.case_ids = list(case_ids)
        self.sampling = sampling
        self.augment = augment
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.with_weights = with_weights
        self._cases: dict[str, Any] = {}

    def __len__(self) -> int:
        return 2**62

    def _case(self, case_id: str) -> Any:
        if case_id not in self._cases:
            from medseg.preprocess.cache import load_case

            self._cases[case_id] = load_case(self.prep_dir, case_id, mmap=True)
        return self._cases[case_id]

    def make_batch(self, step: int) -> dict[str, np.ndarray]:
        rng = batch_rng(self.seed, self.rank, step)
        dims = self.sampling.spatial_dims
        imgs, labs, wts = [], [], []
        forced = foreground_slots(self.batch_size, self.sampling.foreground_fraction, rng)
        for b in range(self.batch_size):
            case = self._case(self.case_ids[int(rng.integers(len(self.case_ids)))])
            if case.label is None:
                raise PlanError(
                    f"{self.prep_dir}/cases/{case.case_id}: cached without a label; training "
                    "needs labelled cases (check the manifest and rerun medseg preprocess)"
                )
            shape = tuple(case.image.shape[1:])
            box = output_box(shape, self.sampling, rng, case.locations, force_foreground=forced[b])
            params = draw_spatial(self.augment, rng, dims)
            weights = case.weights if self.with_weights else None
            if self.with_weights and weights is None:
                raise PlanError(
                    f"{self.prep_dir}/cases/{case.case_id}: no weights.npy; the loss needs "
                    "border weight maps, set [preprocess] border_weights = true and rerun "
                    "medseg preprocess"
                )
            img, lab, w = extract_patch(
                case.image, case.label, weights, box, self.sampling, params,
                self.augment.image_order,
            )  # fmt: skip
            imgs.append(augment_intensity(img, self.augment, rng))
            assert lab is not None
            labs.append(lab)
            if w is not None:
                wts.append(w)
        out = {"image": np.stack(imgs), "label": np.stack(labs).astype(np.int64)}
        if wts:
            out["weights"] = np.stack(wts)
        return out

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.make_batch(int(step)).items()}


class StepRange(Sampler[int]):
    """Global step numbers ``start..stop-1`` in order (the sampler state is the step)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# -- distributed ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group set up by ``torchrun`` (env ``WORLD_SIZE`` > 1), else no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _broadcast_flag(flag: bool, info: DistInfo) -> bool:
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


# -- RNG state (weights_only-loadable) ----------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    # the legacy global numpy state is saved because user code and libraries may draw from it
    np_state: Any = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": np_state[1].astype(np.int64).tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        ("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels where the backend has them (warns where it has not)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


# -- files ----------------------------------------------------------------------------------------
def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through the atomic writer: a kill leaves the old file or the new one."""
    atomic.write_with(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint (tensors and plain Python values only)."""
    if not path.is_file():
        raise ModelError(f"{path}: no checkpoint to resume from; start without --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ModelError(f"{path}: unreadable checkpoint ({exc}); start without --resume") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ModelError(f"{path}: not a medseg training checkpoint")
    return ckpt


LOG_FIELDS = [
    "epoch", "step", "train_loss", "val_loss", "val_dice_mean", "lr", "seconds",
    "data_wait_fraction", "iterations_per_second",
]  # fmt: skip


def write_log(
    path: Path,
    rows: list[dict[str, Any]],
    class_names: Sequence[str],
    region_names: Sequence[str] = (),
) -> None:
    """Rewrite ``train_log.csv`` (atomically) with one row per epoch."""
    cols = LOG_FIELDS + [f"val_dice_{n}" for n in class_names]
    cols += [f"val_dice_region_{n}" for n in region_names]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic.write_text(path, buf.getvalue())


# -- validation ------------------------------------------------------------------------------------
@dataclass
class Validation:
    """Dice of every class (mean over cases; ``mean_dice`` averages the foreground classes),
    loss, the predicted classes and, when asked for, the class probabilities; Dice of every
    region of the plan (mean over cases)."""

    dice: dict[str, float]
    mean_dice: float
    loss: float | None
    predictions: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    region_dice: dict[str, float] = field(default_factory=dict)


def _reference(case: Any, prep_dir: Path) -> np.ndarray:
    """The ``(I, J, K)`` class-index label of a cached case; unlabelled cases are an error."""
    if case.label is None:
        raise PlanError(
            f"{prep_dir}/cases/{case.case_id}: cached without a label; training and validation "
            "need labelled cases (check the manifest and rerun medseg preprocess)"
        )
    return np.asarray(case.label[0])


def _predict_case(
    model: nn.Module, image: np.ndarray, dims: int, tile: Any, tta: Any = None
) -> np.ndarray:
    """Logits ``(classes, I, J, K)`` of a whole cached case (2D: slice by slice along K)."""
    from medseg.inference.tiled import predict_logits

    tile_size = tuple(tile) if tile is not None else None
    if dims == 3:
        return predict_logits(model, np.asarray(image), tile_size=tile_size, tta=tta, prepare=True)
    slices = [
        predict_logits(model, np.asarray(image[..., k]), tile_size=tile_size, tta=tta, prepare=True)
        for k in range(image.shape[-1])
    ]
    return np.stack(slices, axis=-1)


def validate(
    model: nn.Module,
    prep_dir: Path,
    case_ids: Sequence[str],
    plan: Plan,
    loss_fn: SegmentationLoss | None,
    tile_size: Any = None,
    *,
    tta: str | Sequence[int] | None = None,
    probabilities: bool = False,
) -> Validation:
    """Exact overlap-tile inference of each whole validation case; Dice per class.

    Ignored voxels (-1) are left out of both prediction and reference. ``tta`` as in
    ``medseg infer``; ``probabilities`` keeps each case's softmax (float32).
    """
    from medseg.inference.tiled import softmax
    from medseg.metrics import dice
    from medseg.preprocess.cache import load_case

    was_training = model.training
    model.eval()
    per_class: dict[str, list[float]] = {n: [] for n in plan.class_names}
    per_region: dict[str, list[float]] = {n: [] for n in plan.regions or {}}
    losses: list[float] = []
    preds: dict[str, np.ndarray] = {}
    probs: dict[str, np.ndarray] = {}
    try:
        for cid in case_ids:
            case = load_case(prep_dir, cid, mmap=True)
            logits = _predict_case(model, case.image, plan.spatial_dims, tile_size, tta)
            if probabilities:
                probs[cid] = softmax(logits).astype(np.float32, copy=False)
            ref = _reference(case, prep_dir)
            cls = np.argmax(logits, axis=0).astype(np.int16)
            preds[cid] = cls.astype(np.uint8 if plan.num_classes < 256 else np.int16)
            valid = ref >= 0
            for c, name in enumerate(plan.class_names):
                per_class[name].append(dice((cls == c) & valid, (ref == c) & valid))
            for name, members in (plan.regions or {}).items():
                per_region[name].append(
                    dice(np.isin(cls, members) & valid, np.isin(ref, members) & valid)
                )
            if loss_fn is not None and not loss_fn.needs_weights:
                with torch.no_grad():
                    lt = torch.from_numpy(logits[None])
                    tt = torch.from_numpy(ref[None, None].astype(np.int64))
                    losses.append(float(loss_fn(lt, tt)))
    finally:
        model.train(was_training)
    dice_mean = {k: float(np.mean(v)) for k, v in per_class.items()}
    return Validation(
        dice_mean,
        float(np.mean([dice_mean[n] for n in plan.class_names[1:]])),
        float(np.mean(losses)) if losses else None,
        preds,
        probs,
        {k: float(np.mean(v)) for k, v in per_region.items()},
    )


def _decide_postprocessing(
    prep_dir: Path, plan: Plan, val: Validation, metric: str = "dice"
) -> dict[str, Any]:
    """``medseg.postprocess.decide_postprocessing`` on the validation predictions (class
    indices and, if kept, probabilities on the preprocessed grid; spacing in mm from each
    case's record)."""
    from medseg.postprocess import decide_postprocessing
    from medseg.preprocess.cache import load_case

    refs, spacings = [], []
    preds = val.predictions
    for cid in preds:
        case = load_case(prep_dir, cid, mmap=True)
        refs.append(_reference(case, prep_dir))
        grid = getattr(case.record, "grid", None)
        spacings.append(tuple(grid.spacing) if grid is not None else (1.0, 1.0, 1.0))
    probs = [val.probabilities[c] for c in preds] if val.probabilities else None
    return decide_postprocessing(
        [p.astype(np.int16) for p in preds.values()],
        refs,
        spacings,
        plan.num_classes,
        probabilities=probs,
        metric=metric,
        regions=plan.regions,
    )


# -- the loop --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a training run produced (``model`` is the unwrapped network, last weights)."""

    run_dir: Path
    model: nn.Module
    epochs_done: int
    steps_done: int
    best_dice: float | None
    stopped_by_budget: bool
    log: list[dict[str, Any]]


def _memory_format(device: torch.device, spatial_dims: int) -> torch.memory_format:
    """Channels-last on the CPU, where oneDNN convolves NHWC/NDHWC without reordering around
    every batch norm, ReLU and pooling; CUDA keeps the contiguous layout cuDNN expects."""
    from medseg.model.unet import channels_last_format

    if device.type != "cpu":
        return torch.contiguous_format
    return channels_last_format(spatial_dims)


def _list_cases(prep_dir: Path) -> list[str]:
    from medseg.preprocess.cache import list_cases

    if not (prep_dir / "plan.json").is_file():
        raise PlanError(f"{prep_dir}: no plan.json; run medseg preprocess first (or pass --prep)")
    ids = list(list_cases(prep_dir))
    if not ids:
        raise PlanError(f"{prep_dir}: no cached cases; run medseg preprocess first")
    return ids


def _poly(lr0: float, progress: float, exponent: float) -> float:
    return lr0 * max(0.0, 1.0 - min(progress, 1.0)) ** exponent


def _dice_regions(cfg: TrainConfig, plan: Plan, prep_dir: Path) -> list[list[int]] | None:
    """The plan's regions (class indices) when ``[train] region_dice`` asks for them."""
    if not cfg.region_dice:
        return None
    if not plan.regions:
        raise PlanError(
            f"{prep_dir / 'plan.json'}: [train] region_dice needs regions; declare them in the "
            'manifest ("regions": {"whole": [1, 2, 3], ...}) and rerun medseg preprocess'
        )
    return [list(v) for v in plan.regions.values()]


def _class_weights(cfg: TrainConfig, prep_dir: Path, ids: Sequence[str], n: int) -> Any:
    """``[train] class_weights``: a list, or ``"balanced"`` (median frequency balancing,
    Eigen & Fergus 2015) from the training labels."""
    if cfg.class_weights is None or isinstance(cfg.class_weights, list):
        return cfg.class_weights
    if cfg.class_weights != "balanced":
        raise PlanError("[train] class_weights must be a list of numbers or 'balanced'")
    from medseg.preprocess.cache import load_case

    counts = np.zeros(n, dtype=np.float64)
    for cid in ids:
        lab = np.asarray(load_case(prep_dir, cid, mmap=True).label).ravel()
        counts += np.bincount(lab[lab >= 0], minlength=n)[:n]
    freq = counts / max(counts.sum(), 1.0)
    present = freq > 0
    w = np.zeros(n)
    w[present] = np.median(freq[present]) / freq[present]
    return w.tolist()


def train(
    pipeline: Pipeline,
    out_dir: str | os.PathLike[str],
    *,
    fold: int | str | None = None,
    epochs: int | None = None,
    resume: bool = False,
    device: str = "auto",
    deterministic: bool | None = None,
    prep_dir: str | os.PathLike[str] | None = None,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train one model (one fold) into ``out_dir``; see the module docstring.

    ``stop_after_epochs`` ends this invocation after that many epochs (as if interrupted; the
    schedule still aims at ``epochs``), so a later ``resume=True`` continues it.
    """
    from medseg.model import UNet
    from medseg.runtime import resolve_device

    cfg = TrainConfig.from_dict(
        {**pipeline.train, **(overrides or {})},
        epochs=epochs,
        fold=fold,
        deterministic=deterministic if deterministic else None,
    )
    prep = Path(prep_dir) if prep_dir is not None else pipeline.prep_dir
    if prep is None:
        raise PlanError(f"{pipeline.path}: no prep_dir in the pipeline; pass --prep DIR")
    out = Path(out_dir)
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(
            f"--device {device}: training runs on cpu or cuda; use one of them or auto"
        )
    info = init_distributed(dev)
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    say = log if (log is not None and info.is_main) else (lambda _m: None)
    set_deterministic(cfg.deterministic)

    plan = Plan.load(prep / "plan.json")
    all_ids = _list_cases(prep)
    if str(cfg.fold) == "manifest":
        train_ids, val_ids = manifest_split(pipeline, all_ids)
    else:
        splits = (
            load_or_create_splits(prep, all_ids, cfg.n_folds, cfg.seed, write=info.is_main)
            if str(cfg.fold) != "all"
            else []
        )
        train_ids, val_ids = fold_cases(splits, cfg.fold, all_ids)
    sampling = SamplingConfig(plan.patch_output_size, plan.margin, cfg.foreground_fraction)
    augment = AugmentConfig.from_dict(cfg.augment)
    loss_fn = SegmentationLoss(
        cfg.loss,
        include_background=cfg.include_background,
        batch_dice=cfg.batch_dice,
        class_weights=_class_weights(cfg, prep, train_ids, plan.num_classes),
        regions=_dice_regions(cfg, plan, prep),
    ).to(dev)

    _seed_everything(cfg.seed)
    model = UNet(**plan.network)
    if tuple(plan.margin) != (model.margin,) * plan.spatial_dims:
        raise PlanError(
            f"{prep / 'plan.json'}: margin {plan.margin} does not match the network's "
            f"{model.margin}; regenerate the plan with medseg preprocess"
        )
    fmt = _memory_format(dev, plan.spatial_dims)
    model.to(dev, memory_format=fmt)  # type: ignore[call-overload]
    lr0 = cfg.learning_rate
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=lr0, momentum=cfg.momentum, nesterov=True,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr0, weight_decay=cfg.weight_decay)

    ipe = cfg.iterations_per_epoch
    total_steps = cfg.epochs * ipe
    start_epoch, step, elapsed_before = 0, 0, 0.0
    best: float | None = None
    rows: list[dict[str, Any]] = []
    # validation of the weights in model.pt, for the postprocessing decision
    model_val: Validation | None = None
    ckpt_path = out / CHECKPOINT_LAST
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        if str(ckpt.get("fold")) != str(cfg.fold):
            raise ModelError(
                f"{ckpt_path}: checkpoint is fold {ckpt.get('fold')}, not {cfg.fold}; "
                "resume with the same --fold"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        elapsed_before = float(ckpt.get("elapsed", 0.0))
        best = ckpt.get("best")
        rows = list(ckpt.get("log", []))
        _set_rng_state(ckpt["rng"])
        say(f"resuming {out} at epoch {start_epoch} (step {step})")
    elif info.is_main:
        if ckpt_path.exists():
            raise ModelError(f"{out}: already holds a training run; use --resume or a new --out")
        out.mkdir(parents=True, exist_ok=True)
        plan.save(out / "plan.json")
        if pipeline.text:
            atomic.write_text(out / "pipeline.toml", pipeline.text)
    _barrier(info)

    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    dataset = PatchBatches(
        prep, train_ids, sampling, augment, cfg.batch_size, cfg.seed, info.rank,
        with_weights=loss_fn.needs_weights,
    )  # fmt: skip
    end_epoch = (
        cfg.epochs
        if stop_after_epochs is None
        else min(cfg.epochs, start_epoch + stop_after_epochs)
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=StepRange(step, end_epoch * ipe),
        num_workers=cfg.workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if cfg.workers > 0 else None,
        persistent_workers=False,
        # batches draw from their own (seed, rank, step) streams; a private generator keeps
        # the loader from consuming the global torch RNG, so resumed runs stay identical
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    autocast = cfg.amp and bf16_autocast(dev)
    budget = cfg.time_budget_minutes * 60.0 if cfg.time_budget_minutes else None
    writer = _tensorboard(out) if (cfg.tensorboard and info.is_main) else None
    t_start = time.perf_counter()
    val_seconds = 0.0
    stopped = False
    epoch = start_epoch
    bar = _progress(progress and info.is_main)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def save_all(epoch_done: int) -> None:
        if not info.is_main:
            return
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ckpt = {
            "model": state,
            "optimizer": opt.state_dict(),
            "epoch": epoch_done,
            "step": step,
            "elapsed": elapsed(),
            "best": best,
            "fold": str(cfg.fold),
            "train_cases": train_ids,
            "val_cases": val_ids,
            "rng": _rng_state(),
            "sampler": {"seed": cfg.seed, "world_size": info.world_size, "step": step},
            "config": {k: v for k, v in asdict(cfg).items() if v is not None},
            "log": rows,
        }
        save_torch(out / CHECKPOINT_LAST, ckpt)
        if cfg.select == "last" or not val_ids:
            save_torch(out / "model.pt", state)
        write_log(out / "train_log.csv", rows, plan.class_names, list(plan.regions or {}))

    # steps repeat the same allocations: keep freed activations in the heap (medseg.heap;
    # measured 0.99 -> 0.64 s per BraTS-sized 3D step); workers forked below inherit it
    with bar, heap.kept_freed_memory(dev.type == "cpu"):
        batches = iter(loader)
        task = bar.add_task("train", total=(end_epoch - start_epoch) * ipe, loss=float("nan"))
        while epoch < end_epoch and not stopped:
            net.train()
            t_epoch, wait, losses = time.perf_counter(), 0.0, []
            for _ in range(ipe):
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                x = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=fmt)
                y = batch["label"].to(dev, non_blocking=True)
                w = batch["weights"].to(dev, non_blocking=True) if "weights" in batch else None
                progress_frac = step / total_steps
                if budget:
                    progress_frac = max(progress_frac, elapsed() / budget)
                lr = _poly(lr0, progress_frac, cfg.poly_exponent)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = net(x)
                loss = loss_fn(logits.float(), y, w)
                if not torch.isfinite(loss):
                    raise ModelError(
                        f"training diverged at step {step} (loss {loss.item()}); lower [train] lr"
                    )
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                losses.append(float(loss.detach()))
                bar.update(task, advance=1, loss=losses[-1])
                if budget and _broadcast_flag(elapsed() + 1.2 * val_seconds + 5 > budget, info):
                    stopped = True
                    break
            epoch += 1
            # DDP broadcasts rank 0's buffers (batch-norm statistics) before each forward; do it
            # once more so every rank ends the epoch with the model rank 0 validates and saves
            _sync_buffers(model, info)
            seconds = time.perf_counter() - t_epoch
            row: dict[str, Any] = {
                "epoch": epoch,
                "step": step,
                "train_loss": round(float(np.mean(losses)), 6),
                "lr": lr,
                "seconds": round(seconds, 3),
                "data_wait_fraction": round(wait / max(seconds, 1e-9), 4),
                "iterations_per_second": round(len(losses) / max(seconds, 1e-9), 3),
            }
            last = epoch == end_epoch or stopped
            if val_ids and info.is_main and (epoch % cfg.val_every == 0 or last):
                tv = time.perf_counter()
                v = validate(model, prep, val_ids, plan, loss_fn, cfg.val_tile_size)
                val_seconds = time.perf_counter() - tv
                row["val_loss"] = v.loss
                row["val_dice_mean"] = round(v.mean_dice, 6)
                row.update({f"val_dice_{k}": round(d, 6) for k, d in v.dice.items()})
                row.update({f"val_dice_region_{k}": round(d, 6) for k, d in v.region_dice.items()})
                if cfg.select == "last":
                    model_val = v
                if best is None or v.mean_dice > best:
                    best = v.mean_dice
                    state = {k: t.detach().cpu() for k, t in model.state_dict().items()}
                    save_torch(out / CHECKPOINT_BEST, state)
                    if cfg.select == "best":
                        model_val = v
                        save_torch(out / "model.pt", state)
                say(
                    f"epoch {epoch}: loss {row['train_loss']:.4f}, val Dice {v.mean_dice:.4f} "
                    f"({', '.join(f'{k} {d:.3f}' for k, d in v.dice.items())})"
                    + "".join(f", region {k} {d:.3f}" for k, d in v.region_dice.items())
                )
            else:
                say(f"epoch {epoch}: loss {row['train_loss']:.4f}")
            val_seconds = _broadcast_float(val_seconds, info)
            rows.append(row)
            if writer is not None:
                for k, val in row.items():
                    if isinstance(val, (int, float)) and k != "epoch":
                        writer.add_scalar(k, val, epoch)
            save_all(epoch)
            _barrier(info)
    del batches

    if info.is_main:
        if cfg.select == "best" and val_ids and not (out / "model.pt").exists():
            save_torch(out / "model.pt", {k: t.cpu() for k, t in model.state_dict().items()})
        finished = epoch >= cfg.epochs or stopped
        if finished and cfg.postprocess and val_ids:
            # decide on what `medseg infer` will see: the same TTA and, for probability
            # steps (two-class cuts, region decoding), the probabilities
            tta = pipeline.infer.get("tta")
            want_probs = plan.num_classes == 2 or bool(plan.regions)
            if model_val is None or tta or want_probs:
                chosen = UNet(**plan.network).to(dev)
                chosen.load_state_dict(torch.load(out / "model.pt", weights_only=True))
                model_val = validate(
                    chosen,
                    prep,
                    val_ids,
                    plan,
                    None,
                    cfg.val_tile_size,
                    tta=tta,
                    probabilities=want_probs,
                )
            atomic.write_json(
                out / "postprocessing.json",
                _decide_postprocessing(prep, plan, model_val, cfg.postprocess_metric),
            )
        atomic.write_json(
            out / "training.json",
            {
                "fold": str(cfg.fold),
                "train_cases": train_ids,
                "val_cases": val_ids,
                "epochs_done": epoch,
                "steps_done": step,
                "best_val_dice_mean": best,
                "stopped_by_time_budget": stopped,
                "seconds": round(elapsed(), 1),
                "world_size": info.world_size,
                "device": str(dev),
                "precision": "bf16 autocast" if autocast else "float32",
                "config": {k: v for k, v in asdict(cfg).items() if v is not None},
            },
        )
    if writer is not None:
        writer.close()
    _barrier(info)
    return TrainResult(out, model, epoch, step, best, stopped, rows)


def _sync_buffers(model: nn.Module, info: DistInfo) -> None:
    if info.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def _broadcast_float(x: float, info: DistInfo) -> float:
    if not info.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def _tensorboard(out: Path) -> Any:
    """A TensorBoard writer when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text("-- it/s" if task.speed is None else f"{task.speed:.2f} it/s")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        Speed(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


__all__ = [
    "TrainConfig",
    "TrainResult",
    "make_splits",
    "load_or_create_splits",
    "fold_cases",
    "train",
    "validate",
]
