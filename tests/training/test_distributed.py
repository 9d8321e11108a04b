"""DistributedDataParallel: two CPU processes (gloo) end with identical weights."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from medseg.model import UNet
from medseg.training import train
from medseg.training.checkpoint import CHECKPOINT_LAST
from tests.training.synthetic import synthetic_pipeline, tiny_plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_rank(rank: int, world: int, port: int, prep: str, out: str, dump: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    res = train(synthetic_pipeline(Path(prep)), Path(out), epochs=1, device="cpu", progress=False)
    torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, f"{dump}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_keep_identical_weights(prep: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(
        _ddp_rank,
        args=(2, _free_port(), str(prep), str(tmp_path / "run"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_LAST, weights_only=True)
    assert ckpt["sampler"]["world_size"] == 2 and ckpt["step"] == 4
    # weights moved away from the seeded initialisation
    torch.manual_seed(12345)
    init = UNet(**tiny_plan().network).state_dict()
    assert any(not torch.equal(init[k], s0[k]) for k in init if k.endswith("weight"))


_TORCHRUN = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29500"}  # fmt: skip


def test_only_the_full_launcher_environment_makes_a_process_group() -> None:
    from medseg.training.distributed import launch_rank, launched_as_group

    assert launched_as_group(_TORCHRUN) and launch_rank(_TORCHRUN) == 1
    for missing in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env = {k: v for k, v in _TORCHRUN.items() if k != missing}
        assert not launched_as_group(env) and launch_rank(env) == 0, missing
    assert not launched_as_group({**_TORCHRUN, "WORLD_SIZE": "1"})
    assert not launched_as_group({"WORLD_SIZE": "2"}) and launch_rank({"RANK": "3"}) == 0


def test_a_stray_world_size_trains_in_one_process_and_says_so_once(
    prep: Path, tmp_path: Path, monkeypatch
) -> None:
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    said: list[str] = []
    res = train(synthetic_pipeline(prep), tmp_path / "run", epochs=1, device="cpu",
                progress=False, log=said.append)  # fmt: skip
    assert not torch.distributed.is_initialized()
    assert res.steps_done == 4 and res.rank == 0
    warnings = [m for m in said if "WORLD_SIZE" in m]
    assert len(warnings) == 1 and "WORLD_SIZE=2 is ignored" in warnings[0]
    assert "\n" not in warnings[0]
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_LAST, weights_only=True)
    assert ckpt["sampler"]["world_size"] == 1
