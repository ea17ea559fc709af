"""Data-parallel training under ``torchrun`` (PyTorch DDP): NCCL on GPUs, gloo on CPUs. The thin shell around
``model.train.Shard``: the process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), and ``launch`` starts torchrun for ``--nproc N``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

WORLD = "WORLD_SIZE"


def under_torchrun() -> bool:
    """Whether this process is one of several ranks started by torchrun."""
    return int(os.environ.get(WORLD, "1")) > 1


def local_device(cuda: bool) -> Any:
    """This rank's device: its own GPU (``LOCAL_RANK``) with CUDA, else the CPU."""
    import torch

    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if cuda else torch.device("cpu")


def join(cuda: bool) -> Any:
    """Join torchrun's process group and return this rank's ``Shard`` (None when not under torchrun)."""
    if not under_torchrun():
        return None
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from model.train import Shard

    if cuda:
        torch.cuda.set_device(local_device(True))
    dist.init_process_group("nccl" if cuda else "gloo")
    device_ids = [local_device(True).index] if cuda else None

    def all_sum(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(m, device_ids=device_ids)

    return Shard(dist.get_rank(), dist.get_world_size(), all_sum, wrap)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the version before any rank goes
        dist.destroy_process_group()


def launch(nproc: int, module_args: Sequence[str]) -> int:
    """Run ``python -m <module_args>`` as ``nproc`` ranks on this machine (``torchrun --standalone``); the exit
    status is torchrun's (non-zero when any rank failed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([*cmd, *module_args], env=env).returncode
