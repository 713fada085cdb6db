"""Forwards over (prompt, response) batches that PPO and evaluation share: response log-probs and values.

Token t of the response (absolute position P+t) is predicted at position P+t-1, and its value is
the value of that same state (TRL's alignment). Leading all-padding columns are dropped and the
heads run on the last T+1 positions only: same numbers, less work.
"""

from __future__ import annotations

import contextlib

import torch

from stackllama_ds.models.padding import position_ids_from_mask, trim_left_padding
from stackllama_ds.rl import logprobs_from_logits


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
