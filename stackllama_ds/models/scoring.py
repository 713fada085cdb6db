"""Reward-model scores of question + answer texts: one packed row (each question once, no padding;
``models.packed``) where the model's attention takes a 4D mask, else right-padded batches run in
length groups to pad less."""

from __future__ import annotations

import torch

from stackllama_ds.data.packed_pairs import pack_groups, pack_pairs
from stackllama_ds.data.template import format_qa
from stackllama_ds.models.forward import is_partitioned
from stackllama_ds.models.packed import packed_head_scores, supports_packed
from stackllama_ds.models.padding import pad


def length_groups(lengths: torch.Tensor, groups: int | None = None, min_saving: float = 0.1) -> list[torch.Tensor]:
    """Row indices of a right-padded batch in one or two groups by length, shortest first.

    Two forwards over (rows, the group's own longest) instead of one over (all rows, the longest)
    when that pads at least ``min_saving`` fewer tokens. ``groups=2`` always splits (at the best
    point): ZeRO-3 ranks must run the same number of forwards, whatever their lengths.
    """
    lengths = lengths.cpu()
    order = torch.argsort(lengths, stable=True)
    ls = lengths[order].tolist()
    n = len(ls)
    if n < 2 or groups == 1:
        return [order]
    # cost of splitting after the k shortest rows: k x l[k-1] + (n - k) x l[n-1] padded tokens
    k, cost = min(((k, k * ls[k - 1] + (n - k) * ls[-1]) for k in range(1, n)), key=lambda x: (x[1], x[0]))
    if groups is None and cost > (1 - min_saving) * n * ls[-1]:
        return [order]
    return [order[:k], order[k:]]


def right_padded_scores(forward, ids: torch.Tensor, lengths: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """Scores (B,) of a right-padded causal batch, run as ``length_groups`` forwards (same numbers:
    under the causal mask no real token sees the padding). ``forward(ids (n, T)) -> (n,)``."""
    parts = [(g, forward(ids[g.to(ids.device), : int(lengths[g].max())])) for g in length_groups(lengths, groups)]
    idx = torch.cat([g for g, _ in parts])
    inverse = torch.empty_like(idx)
    inverse[idx] = torch.arange(len(idx))
    return torch.cat([v for _, v in parts])[inverse.to(parts[0][1].device)]


@torch.no_grad()
def shared_question_scores(reward, seqs: list, questions: list[str], device) -> torch.Tensor:
    """Scores (B, K) of token sequences in ONE packed row, in their order: the sequences of one question
    form a group that holds their common prefix once (``ask``'s samples), one-sequence groups attend
    causally (PPO's responses). One forward, whatever B: ZeRO-3 ranks run the same number."""
    by_q: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_q.setdefault(q, []).append(i)
    order = torch.tensor([i for idx in by_q.values() for i in idx])
    r = packed_head_scores(reward, pack_groups([[seqs[i] for i in idx] for idx in by_q.values()]), device)
    out = torch.empty_like(r)
    out[order.to(r.device)] = r  # back to the caller's order
    return out.float().cpu()  # (B, K)


@torch.no_grad()
def pair_head_scores(reward, pairs, pad_id: int, device) -> torch.Tensor:
    """Every head's scores (2B, K) of B ``(chosen ids, rejected ids, ...)`` pairs, ``[chosen..., rejected...]``:
    one packed row (each question once), else one right-padded batch in length groups."""
    if supports_packed(reward):
        return packed_head_scores(reward, pack_pairs(pairs), device).float().cpu()
    ids, mask = pad([p[0] for p in pairs] + [p[1] for p in pairs], pad_id, "right")  # (2B, T)
    # right padding: the score is read at the last real token; no real token sees a pad
    return right_padded_scores(lambda x: reward(input_ids=x, use_cache=False).logits.float(), ids.to(device),
                               mask.sum(1), groups=2 if is_partitioned(reward) else None).cpu()


@torch.no_grad()
def reward_head_scores(reward, tok, questions: list[str], responses: list[str], device) -> torch.Tensor:
    """Raw reward-model logits (B, K) for question + response in the one template: every head (K = 2
    for an ODIN reward model: quality, length). One packed row where the attention allows, else right-padded."""
    enc = tok([format_qa(q, r) for q, r in zip(questions, responses)], add_special_tokens=True)["input_ids"]
    if supports_packed(reward):
        return shared_question_scores(reward, enc, questions, device)
    ids, mask = pad(enc, tok.pad_token_id, "right")
    # HF reads the score at the last non-pad token; with right padding that is the last real one,
    # and no real token sees a pad under the causal mask, so no padding mask (SDPA's fused path).
    return right_padded_scores(lambda x: reward(input_ids=x, use_cache=False).logits.float(),
                               ids.to(device), mask.sum(1), groups=2 if is_partitioned(reward) else None).cpu()


def reward_scores(reward, tok, questions: list[str], responses: list[str], device) -> torch.Tensor:
    """Raw reward-model logits (B,): column 0, the quality head (an ODIN model's length head is left out)."""
    return reward_head_scores(reward, tok, questions, responses, device)[:, 0]
