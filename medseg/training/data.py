"""The patch dataset: item ``step`` is the whole batch of that step on one rank, drawn from its
own generator ``(seed, rank, step)`` (:func:`medseg.training.sampling.batch_rng`), so the step
counter is the whole sampler state and a batch does not depend on which DataLoader worker made
it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medseg.errors import PlanError
from medseg.training.augment import AugmentConfig, augment_intensity, draw_spatial, extract_patch
from medseg.training.sampling import SamplingConfig, batch_rng, foreground_slots, output_box


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
