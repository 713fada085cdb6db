"""Rollout generation from a DeepSpeed actor, including ZeRO-3 without per-token gathers.

Under ZeRO-3 each forward all-gathers every layer's parameters, so token-by-token generation
pays one full gather per token. ``GenerationCopy`` instead gathers once per rollout into a plain
(unpartitioned) copy of the policy, as DeepSpeed-Chat's hybrid engine does, and generates from
it at full speed; ``gather_generation: false`` keeps the partitioned path for actors too large
to gather, with ``synced_gpus`` so every rank runs the same number of forwards.
"""

from __future__ import annotations

from contextlib import nullcontext

import deepspeed
import torch
from torch import nn


class GenerationCopy:
    """A plain copy of a ZeRO-3 actor's policy, refreshed from the partitioned weights per rollout.

    ``template`` is a module of the same structure (built before ``deepspeed.initialize``).
    ``prefix`` is where the policy sits inside the engine's module (``"policy."`` for
    ActorWithValueHead).
    """

    def __init__(self, template: nn.Module, prefix: str = "policy."):
        self.model = template
        self.model.requires_grad_(False)
        self.model.eval()
        self.prefix = prefix

    @torch.no_grad()
    def refresh(self, engine) -> nn.Module:
        """Collective: every rank gathers the partitioned weights once and copies them in."""
        src = {n[len(self.prefix) :]: p for n, p in engine.module.named_parameters() if n.startswith(self.prefix)}
        dst = dict(self.model.named_parameters())
        params = [src[n] for n in dst if n in src]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for n, p in dst.items():
                p.data.copy_(src[n].data.to(p.dtype))
        return self.model


@torch.no_grad()
def sample(
    policy: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: int,
    pad_token_id: int,
    synced_gpus: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Plain sampling (top_k=0, top_p=1, temperature 1, no min_length) for exactly ``new_tokens``.

    EOS does not stop generation: every rank runs the same number of steps (ZeRO-3 needs that)
    and the caller cuts each response at its first EOS, as StackLLaMA did. Returns (B, new_tokens).
    """
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=temperature,
        max_new_tokens=new_tokens,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    was_training = policy.training
    policy.eval()
    ctx = torch.autocast("cpu", enabled=False) if input_ids.device.type == "cpu" else nullcontext()
    with ctx:
        out = policy.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=gc, synced_gpus=synced_gpus
        )
    if was_training:
        policy.train()
    return out[:, input_ids.shape[1] :]
