"""Build DeepSpeed engines: trainable (optimizer + schedule) and frozen (inference only)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import deepspeed
import torch

from stackllama_ds.config import EngineConfig, OptimConfig
from stackllama_ds.engines import dist
from stackllama_ds.engines.ds_config import ds_config
from stackllama_ds.hardware import has_cuda, release_free_heap, torch_dtype
from stackllama_ds.logs import prints_to_rank_log


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup_steps``, then cosine/linear decay to 0, or constant.

    Not transformers' ``get_scheduler``: its warmup is ``step / warmup`` (LR 0 on the first step, full
    LR one step later than here) and its cosine rises again after ``total_steps``; DeepSpeed's
    WarmupLR warms up as step / warmup too, rejects warmup 0 and treats 1 as 2 (tests/engines/test_lr_schedule.py).
    """

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return fn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases and norm weights (1-D) are not decayed (as in HF Trainer)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def cast_added_parameters(model: torch.nn.Module, eng: EngineConfig) -> None:
    """Cast what was added to a ZeRO-3 model after ``zero3_init`` (value head, LoRA adapters) to the
    engine's dtype. ``deepspeed.initialize`` casts a whole module to bf16/fp16, except a module with
    ZeRO-3 parameters already: then it casts nothing, and an fp32 value head on bf16 hidden states
    fails in the first forward ("expected m1 and m2 to have the same dtype")."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return  # deepspeed.initialize casts it
    td = torch_dtype(eng.dtype)
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != td:
            p.data = p.data.to(td)


def build_train_engine(
    model: torch.nn.Module,
    eng: EngineConfig,
    optim: OptimConfig,
    *,
    total_steps: int,
    grad_accum: int,
) -> deepspeed.DeepSpeedEngine:
    """A trainable engine: AdamW over the parameters that require grad, warmup + schedule."""
    if eng.gradient_checkpointing:
        # HF models (peft forwards the call) and the value-head wrappers of models/load.py have it;
        # a model without it must not train as if its activations were recomputed (plan.py counts it).
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        elif hasattr(model, "gradient_checkpointing_enable"):  # transformers 4
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        else:
            raise ValueError(f"gradient_checkpointing: {type(model).__name__} cannot checkpoint its activations")
        if hasattr(model, "config"):
            model.config.use_cache = False
    if dist.world_size() == 1 and eng.zero_stage in (1, 2) and not eng.offload_optimizer:
        # Nothing to partition on one rank; the ZeRO optimizer's bucket copies are pure cost.
        print(f"[note] ZeRO-{eng.zero_stage} on 1 rank partitions nothing: zero_stage 0 is faster "
              "(see bench/RESULTS.md)", file=sys.stderr, flush=True)
    cast_added_parameters(model, eng)
    cfg = ds_config(eng, world_size=dist.world_size(), grad_accum=grad_accum, optim=optim, on_cuda=has_cuda())
    fn = lr_lambda(optim.scheduler, optim.warmup_steps, total_steps)
    with prints_to_rank_log():  # DeepSpeed's memory report ("MA ... Max_MA") is print()ed
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, optim.weight_decay),
            config=cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn),
        )
    # from_pretrained returns a model in eval mode: without this, dropout stays off until the first
    # evaluation switches it on (so a resumed run would train differently from an uninterrupted one).
    engine.train()
    release_free_heap()
    return engine


def build_eval_engine(model: torch.nn.Module, eng: EngineConfig) -> deepspeed.DeepSpeedEngine:
    """A frozen engine (reference, reward): no optimizer state, its own ZeRO stage and dtype."""
    for p in model.parameters():
        p.requires_grad_(False)
    cast_added_parameters(model, eng)
    cfg = ds_config(eng, world_size=dist.world_size(), grad_accum=1, optim=None, on_cuda=has_cuda())
    if eng.zero_stage in (1, 2):
        # ZeRO-1/2 partition optimizer state and gradients only: a frozen model gains nothing.
        cfg["zero_optimization"] = {"stage": 0}
    with prints_to_rank_log():  # "begin bf16_optimizer" and its memory report
        engine, _, _, _ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    release_free_heap()
    return engine
