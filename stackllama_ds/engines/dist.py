"""Process group and rank helpers. Stages call these instead of torch.distributed."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist

_TIMEOUT_S = 600.0  # the process group's collective timeout, as given to init()


def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"


def init(backend: str = "auto", timeout_s: int = 600) -> None:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_* (a 1-rank group when unset).

    The timeout bounds how long a collective waits for a dead peer, so a lost rank ends the job in
    minutes rather than after NCCL's default of 30 min or more.
    """
    global _TIMEOUT_S
    if tdist.is_initialized():
        return
    _TIMEOUT_S = float(timeout_s)
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if backend == "auto":
        backend = "nccl" if cuda_available() else "gloo"
    if cuda_available():
        torch.cuda.set_device(local_rank())
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def collective_timeout_s() -> float:
    """How long a collective (barrier included) waits for a peer before failing: a bound for waits
    that are not collectives."""
    return _TIMEOUT_S


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if cuda_available() else torch.device("cpu")


def barrier() -> None:
    """Bounded by the collective timeout: for waits of seconds. Rank 0's long single-rank work
    (export) is waited for with ``runtime.on_main_rank``, which is not."""
    if tdist.is_initialized() and world_size() > 1:
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a float64 copy; returns it)."""
    out = t.detach().to(torch.float64).clone()
    if tdist.is_initialized() and world_size() > 1:
        dev = device()
        out = out.to(dev)
        tdist.all_reduce(out)
        out = out.cpu()
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().to(torch.float64).clone()
    if tdist.is_initialized() and world_size() > 1:
        out = out.to(device())
        tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
        out = out.cpu()
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a stop request, a NaN)."""
    return bool(all_reduce_max(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def broadcast_object(obj, src: int = 0):
    if not (tdist.is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not (tdist.is_initialized() and world_size() > 1):
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
