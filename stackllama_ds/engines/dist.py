"""Process group and rank helpers. Stages call these instead of torch.distributed."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist

from stackllama_ds.hardware import cuda_device_index, free_port, has_cuda

_TIMEOUT_S = 600.0  # the process group's collective timeout, as given to init()


def init(backend: str = "auto", timeout_s: int = 600) -> None:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_* (a 1-rank group when unset).

    The timeout bounds how long a collective waits for a dead peer, so a lost rank ends the job in
    minutes rather than after NCCL's default of 30 min or more.
    """
    global _TIMEOUT_S
    if tdist.is_initialized():
        return
    _TIMEOUT_S = float(timeout_s)
    if not has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    if backend == "auto":
        backend = "nccl" if has_cuda() else "gloo"
    if has_cuda():
        bind_cuda_device()
    import deepspeed

    _skip_unused_ops()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def bind_cuda_device() -> int:
    """Make this rank's visible GPU (``hardware.cuda_device_index``) the current device, and LOCAL_RANK
    its index: DeepSpeed (init_process_group's device_id, the engine, zero.Init) and transformers take
    LOCAL_RANK itself as the device index, so with one GPU per Slurm task local rank 5 would ask for
    cuda:5 of 1. Unchanged where every rank sees all the node's GPUs."""
    idx = cuda_device_index(local_rank(), torch.cuda.device_count())
    os.environ["LOCAL_RANK"] = str(idx)
    torch.cuda.set_device(idx)
    return idx


def _skip_unused_ops() -> None:
    """Keep init_distributed from JIT-compiling DeepSpeed's shared-memory comm op on CPU.

    Its only use is ``deepspeed.comm.inference_all_reduce`` (tensor-parallel inference layers), which
    nothing here calls. Building it cost each fresh node 90-400 s at job start (400 s on 2 Xeon
    cores), needed a compiler there, and a stop signal that killed the build failed the job (exit 1).
    Without it DeepSpeed uses plain torch.distributed. The CUDA accelerator has no such op.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")  # as comm/torch.py build_shm_op
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False  # build_shm_op returns None for it


def collective_timeout_s() -> float:
    """How long a collective (barrier included) waits for a peer before failing: a bound for waits
    that are not collectives."""
    return _TIMEOUT_S


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if not has_cuda():
        return torch.device("cpu")
    return torch.device("cuda", cuda_device_index(local_rank(), torch.cuda.device_count()))


def place(x):
    """Put a tensor, a dict of tensors or a module on this rank's device (its visible GPU, else the
    CPU): the one helper every stage uses for models, copies and batches. Quantized (bitsandbytes)
    models stay where loading placed them: they cannot be moved."""
    if isinstance(x, dict):
        return {k: place(v) for k, v in x.items()}
    quantized = getattr(x, "is_loaded_in_8bit", False) or getattr(x, "is_loaded_in_4bit", False)
    return x if quantized else x.to(device())


def barrier() -> None:
    """Bounded by the collective timeout: for waits of seconds. Rank 0's long single-rank work
    (export) is waited for with ``rank0.on_main_rank``, which is not."""
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


def reduce_sums(sums: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Sum each named value over all ranks in one all-reduce (float64). Every rank passes the same
    keys in the same order: the values travel as one tensor in that order."""
    keys = list(sums)
    total = all_reduce_sum(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, total.tolist()))


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
