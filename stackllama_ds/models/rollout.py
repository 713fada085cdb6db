"""Tensor plumbing that PPO and evaluation share: padding, EOS cuts, response log-probs, RM scores."""

from __future__ import annotations

import torch

from stackllama_ds.data.template import format_qa
from stackllama_ds.rl import logprobs_from_logits


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (as HF generate computes them): cumsum(mask) - 1, >= 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest: (ids (B, P), mask (B, P))."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s) :] = torch.tensor(s)
        mask[i, P - len(s) :] = 1
    return ids, mask


def trim_left_padding(ids: torch.Tensor, mask: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop the leading columns that are padding in every row (a minibatch of short prompts
    padded to the batch's longest): same positions and logits, less work. Returns (ids, mask, P)."""
    real = mask[:, :P].any(0).nonzero()
    c = int(real[0]) if len(real) else max(P - 1, 0)
    c = min(c, P - 1)  # keep position P-1: it predicts the first response token
    return ids[:, c:], mask[:, c:], P - c


def cut_at_eos(resp: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, T) mask: 1 up to and including the first EOS, 0 after it (StackLLaMA's cut)."""
    is_eos = (resp == eos).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()  # no EOS strictly before t


def response_logprobs(lm, ids: torch.Tensor, mask: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B, T) and logits (B, T, V) of the response tokens ids[:, P:] under a causal LM.

    Token t of the response (absolute position P+t) is predicted at position P+t-1. All-padding
    prompt columns are skipped and the LM head runs on the last T+1 positions only.
    """
    ids, mask, P = trim_left_padding(ids, mask, P)
    T = ids.shape[1] - P
    out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
             logits_to_keep=T + 1)
    logits = out.logits[:, :-1]
    return logprobs_from_logits(logits, ids[:, P:]), logits


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


def is_partitioned(model) -> bool:
    """A ZeRO-3 engine: every rank must run the same forwards."""
    fn = getattr(model, "zero_optimization_partition_weights", None)
    return bool(fn()) if callable(fn) else False


@torch.no_grad()
def reward_scores(reward, tok, questions: list[str], responses: list[str], device) -> torch.Tensor:
    """Raw reward-model logits (B,) for question + response in the one template, right-padded."""
    enc = tok([format_qa(q, r) for q, r in zip(questions, responses)], add_special_tokens=True)["input_ids"]
    ids = torch.full((len(enc), max(len(e) for e in enc)), tok.pad_token_id, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
    lengths = torch.tensor([len(e) for e in enc])
    # HF reads the score at the last non-pad token; with right padding that is the last real one,
    # and no real token sees a pad under the causal mask, so no padding mask (SDPA's fused path).
    return right_padded_scores(lambda x: reward(input_ids=x).logits[:, 0].float(), ids.to(device), lengths,
                               groups=2 if is_partitioned(reward) else None).cpu()
