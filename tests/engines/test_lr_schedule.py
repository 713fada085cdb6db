"""The LR schedule of ``build_train_engine``: exact values per step, resume through the scheduler's
state_dict, and why no library schedule replaces it (transformers' warm up one step later)."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from stackllama_ds.config import OptimConfig
from stackllama_ds.engines.build import lr_lambda

SCHEDULERS = typing.get_args(OptimConfig.model_fields["scheduler"].annotation)
# (warmup, total): no warmup, the usual, warmup == total, warmup > total, one step, long runs.
PAIRS = [(0, 10), (3, 10), (10, 10), (12, 10), (0, 1), (1, 1), (2, 1), (100, 1000), (7, 333)]


def reference(scheduler: str, warmup: int, total: int, step: int) -> float:
    """The schedule as first written (kept here verbatim so that any change to it shows)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def _lrs(sched: torch.optim.lr_scheduler.LRScheduler, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_the_config_allows_these_schedulers():
    assert set(SCHEDULERS) == {"cosine", "linear", "constant"}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("warmup, total", PAIRS)
def test_every_step_equals_the_reference(scheduler, warmup, total):
    fn = lr_lambda(scheduler, warmup, total)
    steps = range(total + warmup + 5)  # past the end too: decay stays at 0, constant at 1
    assert [fn(s) for s in steps] == [reference(scheduler, warmup, total, s) for s in steps]
    # as build_train_engine drives it: LambdaLR, one step() per optimizer step
    lr = 3e-4
    opt = _opt(lr)
    got = _lrs(torch.optim.lr_scheduler.LambdaLR(opt, fn), opt, len(steps))
    assert got == [lr * reference(scheduler, warmup, total, s) for s in steps]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_resume_from_the_state_dict_continues_the_same_schedule(scheduler):
    warmup, total, cut = 4, 20, 7
    opt = _opt()
    whole = _lrs(torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(scheduler, warmup, total)), opt, total)
    opt = _opt()
    first = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(scheduler, warmup, total))
    head = _lrs(first, opt, cut)
    state = first.state_dict()  # what DeepSpeed's checkpoint stores for the scheduler
    opt = _opt()
    resumed = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(scheduler, warmup, total))
    resumed.load_state_dict(state)
    for group, lr in zip(opt.param_groups, resumed.get_last_lr()):
        group["lr"] = lr  # DeepSpeed restores the optimizer's lr with the optimizer state
    assert head + _lrs(resumed, opt, total - cut) == whole


@pytest.mark.parametrize("ours, theirs", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                          ("cosine", "cosine")])
def test_transformers_schedules_are_not_a_drop_in(ours, theirs):
    """transformers warms up as step / warmup (LR 0 on the first step, peak one step later); ours as
    (step + 1) / warmup. Switching would change every run with warmup, so the schedule stays ours."""
    transformers = pytest.importorskip("transformers")
    warmup, total = 3, 10
    opt = _opt()
    hf = _lrs(transformers.get_scheduler(theirs, opt, num_warmup_steps=warmup, num_training_steps=total), opt, total)
    assert hf[:warmup] == [s / warmup for s in range(warmup)]
    assert [reference(ours, warmup, total, s) for s in range(warmup)] == [(s + 1) / warmup for s in range(warmup)]
