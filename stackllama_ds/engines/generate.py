"""Rollout generation from a DeepSpeed actor, including ZeRO-3 without per-token gathers.

Under ZeRO-3 each forward all-gathers every layer's parameters, so token-by-token generation
pays one full gather per token. ``GenerationCopy`` instead gathers once per rollout into a plain
(unpartitioned) copy of the policy, as DeepSpeed-Chat's hybrid engine does, and generates from
it at full speed; ``gather_generation: false`` keeps the partitioned path for actors too large
to gather (``sample`` runs the same number of forwards on every rank either way).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import deepspeed
import torch
from torch import nn

from stackllama_ds.engines import dist
from stackllama_ds.models.padding import position_ids_from_mask


class GenerationCopy:
    """A plain copy of a ZeRO-3 actor's policy, refreshed from the partitioned weights per rollout.

    ``template`` is a module of the same structure, on the rank's device or moved there (where the
    prompts are); its values do not matter (``models.load.empty_causal_lm``): ``refresh`` copies
    every parameter and buffer. ``prefix`` is where the policy sits inside the engine's module
    (``"policy."`` for ActorWithValueHead).
    """

    def __init__(self, template: nn.Module, prefix: str = "policy."):
        self.model = dist.place(template)
        self.model.requires_grad_(False)
        self.model.eval()
        self.prefix = prefix

    @torch.no_grad()
    def refresh(self, engine) -> nn.Module:
        """Collective: every rank gathers the partitioned weights once and copies them in."""
        src = {n[len(self.prefix) :]: p for n, p in engine.module.named_parameters() if n.startswith(self.prefix)}
        dst = dict(self.model.named_parameters())
        unmatched = sorted(set(dst) - set(src))
        if unmatched:  # a structure mismatch (e.g. a head tied on one side only) would copy garbage
            raise ValueError(f"generation copy: {len(unmatched)} parameters have no counterpart in the actor, "
                             f"e.g. {unmatched[0]!r}")
        params = [src[n] for n in dst]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for n, p in dst.items():
                p.data.copy_(src[n].data.to(p.dtype))
        # Buffers (rotary frequencies) are never partitioned: a plain copy.
        bufs = {n[len(self.prefix) :]: b for n, b in engine.module.named_buffers() if n.startswith(self.prefix)}
        for n, b in self.model.named_buffers():
            if n in bufs:
                b.copy_(bufs[n].to(b.dtype))
        return self.model


@contextmanager
def merged_lora(model: nn.Module):
    """Run with every active LoRA adapter merged into its base weight: no adapter matmuls per decoded
    token. The base weights are restored
    from a copy afterwards, bit for bit (a bf16 unmerge would drift the frozen base, i.e. the
    reference policy). Sampling then follows W + BA rounded once in the model's dtype: the same
    policy up to that rounding; the PPO log-probs still come from the unmerged forward. No-op for
    plain models, quantized bases and ZeRO-3 partitioned weights.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; a plain model needs nothing merged
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters]
    bases = [m.get_base_layer().weight for m in layers]
    if not layers or any(not w.dtype.is_floating_point or hasattr(w, "ds_id") for w in bases):
        yield
        return
    saved = [w.detach().clone() for w in bases]
    try:
        for m in layers:
            m.merge()
        yield
    finally:
        with torch.no_grad():
            for m, w, orig in zip(layers, bases, saved):
                w.copy_(orig)
                m.merged_adapters = []


def draw(logits: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` (B, V) from their raw softmax: the inverse CDF of one uniform
    draw per row. The same distribution as ``torch.multinomial`` (which HF generate calls) at a
    fraction of the cost: multinomial draws an exponential per vocabulary entry, this one uniform
    per row. float64 cumsum, so the
    tail of a 50k vocabulary keeps its mass. Returns (B,) int64."""
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    # right=True: the first token whose cdf exceeds u, so a zero-probability token is never drawn
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


@torch.no_grad()
def sample(
    policy: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Plain sampling (no top-k/top-p, no penalties, no min_length) for exactly ``new_tokens``.

    Our own decode loop over the HF model's forward with its KV cache: each token is drawn from the
    raw softmax of the logits over ``temperature`` (``draw``), so nothing in the model's
    generation_config.json can apply. EOS does not stop generation: every rank runs the same number
    of forwards (a ZeRO-3 actor all-gathers in each one) and the caller cuts each response at its
    first EOS, as StackLLaMA did. LoRA adapters are merged for the call (``merged_lora``). Left-
    padded prompts: the mask and positions skip the padding, as HF generate does. Returns (B, new_tokens).
    """
    was_training = policy.training
    policy.eval()
    ctx = torch.autocast("cpu", enabled=False) if input_ids.device.type == "cpu" else nullcontext()
    out_tokens = []
    with ctx, merged_lora(policy):
        mask = attention_mask
        pos = position_ids_from_mask(mask)
        out = policy(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        nxt = pos[:, -1:] + 1
        bad = torch.zeros((), dtype=torch.bool, device=input_ids.device)
        for t in range(new_tokens):
            logits = out.logits[:, -1].float() / temperature  # (B, V)
            bad |= ~torch.isfinite(logits.logsumexp(-1)).all()
            tok = draw(logits)[:, None]  # (B, 1)
            out_tokens.append(tok)
            if t == new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            out = policy(input_ids=tok, attention_mask=mask, position_ids=nxt, past_key_values=out.past_key_values,
                         use_cache=True)
            nxt = nxt + 1
    if was_training:
        policy.train()
    if bool(bad):  # one check after the loop: no device sync per token
        raise FloatingPointError("sampling: the policy's logits are not finite (NaN/inf weights or activations)")
    return torch.cat(out_tokens, 1) if out_tokens else input_ids.new_empty(input_ids.shape[0], 0)
