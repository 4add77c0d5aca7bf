"""Process-group helpers. The launcher (accelerate launch, torchrun, srun) only provides the environment."""

from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun/accelerate variables, or from Slurm's when srun starts ranks directly."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # srun starting the ranks itself: the step's task count (SLURM_NTASKS is also set in the batch shell,
    # where a plain `python -m sft.train` must stay a single process).
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", 1))
    if "SLURM_PROCID" in os.environ and tasks > 1 and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0)), tasks
    return 0, 0, 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30, always: bool = False) -> tuple[int, int, int]:
    """Join the process group the launcher prepared. `always`: also form a group of one (FSDP2 and
    DeepSpeed need a group even alone, e.g. to resume a sharded run on a single process)."""
    rank, local_rank, world = env_world()
    if world == 1 and always and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if (world > 1 or always) and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, local_rank, world


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together at the end of a run: a rank that exits while a peer's transport still
    talks to it can make that peer abort (gloo: SIGABRT on a reset connection).

    Callers drop their engine first: destroy_process_group only forgets the group, and one still referenced
    (an FSDP2 device mesh holds it) is torn down during interpreter finalisation, where gloo's worker threads
    end in std::terminate (seen once in CI, both ranks, "terminate called without an active exception").
    The collection frees engines that only reference cycles still hold."""
    if is_dist():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum small scalars over ranks (in float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if is_dist():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
