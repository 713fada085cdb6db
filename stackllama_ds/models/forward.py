"""Forwards over (prompt, response) batches that PPO and evaluation share: response log-probs and values.

Token t of the response (absolute position P+t) is predicted at position P+t-1, and its value is
the value of that same state (TRL's alignment). Leading all-padding columns are dropped and the
heads run on the last T+1 positions only: same numbers, less work.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from stackllama_ds.models.padding import position_ids_from_mask, trim_left_padding
from stackllama_ds.rl import logprobs_from_logits

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
             torch.Tensor.bmm}
_LOW = (torch.bfloat16, torch.float16)
_LINEAR = torch._C._nn.linear  # F.linear itself, which ZeRO-3 may rebind to its own wrapper


class Fp32Compute(TorchFunctionMode):
    """While active, linear layers, matmuls and embeddings compute in fp32 from bf16/fp16 weights
    (upcast per call, the parameters untouched), so the whole forward runs in fp32 arithmetic.

    Why: two bf16 forwards of nearly equal functions (the LoRA actor a few updates from its base, the
    reference) do not give nearly equal log-probs. As soon as one bit differs early in the network,
    every later bf16 rounding differs, and each forward carries its own bf16 error against fp32:
    the per-response sum of logp - logp_ref, PPO's KL estimate, gets tenths of a nat of noise where
    fp32's is near zero (tests/stages/test_ppo_forward.py). Computing the head, or only the LoRA delta, in
    fp32 does not help: the error builds up in every layer.
    ``torch.matmul`` is covered because ZeRO-3 may route ``nn.Linear`` through its own
    ``input.matmul(weight.t())``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LINEAR:
            return func(*(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})
        if func in _MATMULS and any(_is_low(a) for a in args) and any(_is_f32(a) for a in args):
            return func(*(_up(a) for a in args), **kwargs)
        out = func(*args, **kwargs)
        if func is F.embedding and _is_low(out):
            return out.float()  # a lookup: upcasting its output is exact
        return out


def _is_low(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in _LOW


def _is_f32(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32


def _up(x):
    return x.float() if _is_low(x) else x


def fp32_compute(enabled: bool = True) -> contextlib.AbstractContextManager:
    """``Fp32Compute`` when ``enabled``, else nothing."""
    return Fp32Compute() if enabled else contextlib.nullcontext()


def is_partitioned(model) -> bool:
    """A ZeRO-3 engine: every rank must run the same forwards."""
    fn = getattr(model, "zero_optimization_partition_weights", None)
    return bool(fn()) if callable(fn) else False


def response_logprobs(lm, ids: torch.Tensor, mask: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B, T) and logits (B, T, V) of the response tokens ids[:, P:] under a causal LM."""
    ids, mask, P = trim_left_padding(ids, mask, P)
    T = ids.shape[1] - P
    out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
             logits_to_keep=T + 1)
    logits = out.logits[:, :-1]
    return logprobs_from_logits(logits, ids[:, P:]), logits


def policy_forward(actor, ids: torch.Tensor, mask: torch.Tensor, P: int,
                   disable_adapter: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs (B, T), values (B, T) and logits (B, T, V) of the response under an
    ``ActorWithValueHead`` (or its engine); ``disable_adapter``: the LoRA base, i.e. the reference."""
    ids, mask, P = trim_left_padding(ids, mask, P)
    T = ids.shape[1] - P
    module = getattr(actor, "module", actor)
    ctx = module.policy.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with ctx:
        logits, values = actor(ids, mask, position_ids_from_mask(mask), keep=T + 1)  # (B, T+1, V), (B, T+1)
    logits = logits[:, :-1]
    return logprobs_from_logits(logits, ids[:, P:]), values[:, :-1], logits


def critic_values(critic, ids: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
    """A separate critic's values (B, T) of the response states, aligned as in ``policy_forward``."""
    ids, mask, P = trim_left_padding(ids, mask, P)
    return critic(ids, mask, position_ids_from_mask(mask), keep=ids.shape[1] - P + 1)[:, :-1]
