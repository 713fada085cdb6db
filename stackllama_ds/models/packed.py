"""Reward-model scores of a shared-prefix packed row (``data.packed_pairs``): one forward, no padding.

    python -m pytest tests/models/test_packed_scores.py -q

The row goes through the model (a DeepSpeed engine, a peft or a plain HF sequence classifier) with
its position ids and a 4D additive mask; transformers uses a 4D mask as given (masking_utils:
"already prepared, or custom"). The classifier itself pools one score per row (at its last non-pad
token), so the score head's per-token output (1, L, K) is read by a forward hook at the N sequence
ends. The head runs on all L positions, as it does in the padded forward; K x H multiply-adds per token.

Attention group by group. SDPA with a mask computes every (query, key) product of the row, L^2,
however much of it is masked. On one row of a micro batch (4 pairs, L ~ 1,560 SmolLM2 tokens, bf16,
forward + backward, 30 layers, 2 CPU cores) that took 27.5 s against 13.0 s for the padded rows'
fused causal attention (8 rows x 300) and 11.7 s for the 4 pairs' blocks alone (4 x 390, masked):
on CPU attention is a large share of the step. Attention never crosses a group (a pair), so
``SDPA_PACKED`` runs SDPA on each group alone with its own block of the mask (``span_biases``):
sum_g n_g^2 products, ~1/B of the row's, and no (L, L) mask is ever built (the model gets a
zero-stride placeholder); a one-sequence group, as PPO scores, takes SDPA's fused causal kernel,
no mask. It is the "sdpa"
function whenever a forward passes no ``packed_spans``, so a model switched to it
(``packed_head_scores`` does so to an "sdpa" model, once) computes every other forward as before.
The spans travel as a forward keyword: activation checkpointing replays them when it recomputes a
layer in the backward pass. Eager attention takes the whole (L, L) mask (same numbers, L^2 work).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from stackllama_ds.data.packed_pairs import PackedRow, attention_bias, span_biases
from stackllama_ds.models.load import hf_parts

SDPA_PACKED = "sdpa_packed"
PACKED_ATTENTION = ("sdpa", SDPA_PACKED, "eager")  # take a 4D float mask; flash_attention_2 does not


def grouped_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, packed_spans: tuple | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run span by span when ``packed_spans`` is given.

    query (1, Hq, L, D), key/value (1, Hkv, L, D) -> output (1, L, Hq, D). ``packed_spans``: one
    (start, end, bias (1, 1, n_g, n_g) or None) per group; ``attention_mask`` is then a placeholder.
    None: a span of one sequence, plain causal (SDPA's fused causal kernel, no mask).
    """
    if packed_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    outs = []
    for s, e, bias in packed_spans:
        if bias is not None and bias.dtype != query.dtype:  # autocast or fp32 arithmetic (Fp32Compute)
            bias = bias.to(query.dtype)
        out, _ = sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], bias,
                                        dropout=dropout, scaling=scaling, is_causal=bias is None, **kwargs)
        outs.append(out)  # (1, n_g, Hq, D)
    return torch.cat(outs, dim=1), None  # (1, L, Hq, D)


AttentionInterface.register(SDPA_PACKED, grouped_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_PACKED, sdpa_mask)  # masks of forwards without a 4D mask: sdpa's


def _lm(model) -> torch.nn.Module:
    lm, _, _ = hf_parts(getattr(model, "module", model))  # a DeepSpeed engine's module, a peft model's base
    return lm


def supports_packed(model) -> bool:
    """The model's attention takes a custom 4D mask (SDPA, eager)."""
    return getattr(_lm(model).config, "_attn_implementation", None) in PACKED_ATTENTION


def compute_dtype(model) -> torch.dtype:
    """The dtype the attention runs in: the input embeddings' (a LoRA adapter's fp32 does not count)."""
    return _lm(model).get_input_embeddings().weight.dtype


def packed_head_scores(model, row: PackedRow, device: torch.device | str) -> torch.Tensor:
    """Every head's score (N, K) of the row's N sequences, in ``row.ends`` order, with grad if enabled.

    ``model`` is called, not its parts: a DeepSpeed engine's forward does ZeRO-3's bookkeeping.
    """
    lm = _lm(model)
    if lm.config._attn_implementation == "sdpa":
        lm.config._attn_implementation = SDPA_PACKED  # "sdpa" for every forward without packed_spans
    dtype, L = compute_dtype(model), row.n_tokens
    if lm.config._attn_implementation == SDPA_PACKED:
        blocks = span_biases(row, dtype, device)
        extra = {"packed_spans": tuple((s, e, b) for (s, e, _), b in zip(row.spans, blocks))}
        mask = torch.zeros((), dtype=dtype, device=device).expand(1, 1, L, L)  # 4D, so taken as given; unread
    else:  # eager: the whole row's mask
        extra, mask = {}, attention_bias(row, dtype, device)  # (1, 1, L, L)
    seen: list[torch.Tensor] = []
    # peft: lm.score is the ModulesToSaveWrapper; its output is the trained copy's (1, L, K)
    hook = lm.score.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model(input_ids=row.input_ids.to(device), position_ids=row.position_ids.to(device), attention_mask=mask,
              use_cache=False,  # else every layer copies its keys and values into a cache nobody reads
              **extra)
    finally:
        hook.remove()
    if len(seen) != 1:
        raise RuntimeError(f"the score head ran {len(seen)} times in one forward, expected once")
    return seen[0][0, row.ends.to(seen[0].device)]  # (N, K)
