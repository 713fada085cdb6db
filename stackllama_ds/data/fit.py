"""Fit question + answer texts into a token limit by cutting the question, not the answers.

    python -c "from stackllama_ds.data.fit import QUESTION_MARKER; print(repr(QUESTION_MARKER))"

Keeping the first ``max_length`` tokens of ``Question: q\\n\\nAnswer: a`` loses the answer behind a long
question, and when both answers of a pair are lost the pair's two texts are the same: it teaches a
reward model nothing (26% of the ten sites' pairs at 320 tokens). The rule, for a pair (or a prompt):

1. Both texts fit: kept whole.
2. Else the question is shortened, the same way for both sides (its start kept: the title and first
   lines, then ``QUESTION_MARKER``), to the longest prefix that lets each answer fit whole.
3. Only when an answer does not fit even behind ``min_question_tokens`` question tokens is that
   answer's tail cut (the question keeps those tokens).
4. A pair whose two texts end up identical is dropped.

Every text is the tokenization of a real ``format_qa(question', answer')``, so what a model scores
here is what it scores anywhere else from the same strings. Cuts fall on token boundaries of the
full text's tokenization; a cut text is re-tokenized and shortened again in the rare case a merge
across the cut makes it longer. Lengths are the answer's tokens as scored (after any cut).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from stackllama_ds.data.template import format_prompt, format_qa

QUESTION_MARKER = " ..."  # appended to a shortened question
MIN_QUESTION_TOKENS = 32  # about a title and a first line
CASES = ("whole", "question_cut", "answer_cut", "dropped")


class FitPair(NamedTuple):
    """A pair as a reward model scores it: int32 ids with BOS, no EOS; answer lengths in tokens."""

    chosen: np.ndarray
    rejected: np.ndarray
    len_chosen: int
    len_rejected: int
    group: str  # the question ("site/qid"): resampling unit of held-out intervals
    case: str = "whole"  # which rule applied (CASES)


class FitPairs(NamedTuple):
    pairs: list[FitPair]
    counts: dict[str, int]  # total and one count per CASES entry (filter: over-length pairs are "dropped")


class _Enc(NamedTuple):
    ids: list[int]
    ends: list[int]  # character end of each token (0 for added special tokens)


def _encode(tok, texts: list[str]) -> list[_Enc]:
    enc = tok(texts, return_offsets_mapping=True)
    return [_Enc(list(i), [e for _, e in o]) for i, o in zip(enc["input_ids"], enc["offset_mapping"])]


def _n_after(e: _Enc, start: int) -> int:
    """Tokens whose text ends after character ``start`` (a token carrying the prompt's last space is one)."""
    return sum(end > start for end in e.ends)


def _prefix_chars(e: _Enc, lo: int, hi: int, n: int) -> int:
    """Character end of the n-th token that ends within (lo, hi]: where to cut to keep n tokens."""
    inside = [end for end in e.ends if lo < end <= hi]
    return lo if n <= 0 or not inside else inside[min(n, len(inside)) - 1]


def _cut_question(q: str, chars: int) -> str:
    return q if chars >= len(q) else q[:chars].rstrip() + QUESTION_MARKER


def _fit_texts(tok, q: str, answers: list[str], encs: list[_Enc], L: int,
               min_q: int) -> tuple[list[_Enc], str, int]:
    """Texts of one question and its answers fitted into L tokens: (encs, case, answer start char)."""
    q0 = len("Question: ")
    a_start = len(format_prompt(q))
    if all(len(e.ids) <= L for e in encs):
        return encs, "whole", a_start
    n_ans = [_n_after(e, a_start) for e in encs]
    e0 = encs[0]
    q_tokens = sum(q0 < end <= q0 + len(q) for end in e0.ends)
    overhead = len(e0.ids) - n_ans[0] - q_tokens + len(tok(QUESTION_MARKER, add_special_tokens=False)["input_ids"])
    keep_q = L - overhead - max(n_ans)  # question tokens that leave room for every answer whole
    case = "question_cut"
    if keep_q < min(min_q, q_tokens):
        keep_q, case = min(min_q, q_tokens), "answer_cut"
    budget = L - overhead - keep_q  # answer tokens allowed behind the shortened question
    for _ in range(4):  # a merge across a cut can add a token: shorten again (rarely more than once)
        qc = _cut_question(q, _prefix_chars(e0, q0, q0 + len(q), keep_q) - q0)
        cut = [a if n <= budget else a[: _prefix_chars(e, a_start, a_start + len(a), budget) - a_start]
               for a, e, n in zip(answers, encs, n_ans)]
        out = _encode(tok, [format_qa(qc, a) for a in cut])
        excess = max(len(e.ids) for e in out) - L
        if excess <= 0:
            return out, case, len(format_prompt(qc))
        if keep_q - excess >= min(min_q, q_tokens):
            keep_q -= excess
        else:
            budget, case = budget - excess, "answer_cut"
    return [_Enc(e.ids[:L], e.ends[:L]) for e in out], "answer_cut", len(format_prompt(qc))  # never seen


def fit_pairs(rows: Iterable[dict], tok, max_length: int, overlength: str = "truncate",
              min_question_tokens: int = MIN_QUESTION_TOKENS, limit: int | None = None,
              batch_size: int = 256) -> FitPairs:
    """Pairs of ``rows`` (dicts with site, qid, question, response_j, response_k) under ``max_length``.

    ``overlength``: "truncate" applies the rule of this module; "filter" drops every pair with a text
    over ``max_length`` (StackLLaMA's reward_modeling.py). ``limit``: stop after that many kept pairs.
    ``tok`` must be a fast tokenizer (offsets); it adds BOS as it is configured to.
    """
    if overlength not in ("filter", "truncate"):
        raise ValueError(f"overlength must be 'filter' or 'truncate', got {overlength!r}")
    counts = dict.fromkeys(("total", *CASES), 0)
    pairs: list[FitPair] = []
    batch: list[dict] = []

    def flush() -> None:
        texts = [format_qa(r["question"], a) for r in batch for a in (r["response_j"], r["response_k"])]
        encs = _encode(tok, texts)
        for i, r in enumerate(batch):
            if limit is not None and len(pairs) >= limit:
                return
            q, two = r["question"], encs[2 * i : 2 * i + 2]
            counts["total"] += 1
            if overlength == "filter" and any(len(e.ids) > max_length for e in two):
                counts["dropped"] += 1
                continue
            two, case, a_start = _fit_texts(tok, q, [r["response_j"], r["response_k"]], two, max_length,
                                            min_question_tokens)
            if two[0].ids == two[1].ids:
                counts["dropped"] += 1
                continue
            counts[case] += 1
            lens = [_n_after(e, a_start) for e in two]  # answer tokens as scored
            pairs.append(FitPair(np.asarray(two[0].ids, np.int32), np.asarray(two[1].ids, np.int32),
                                 lens[0], lens[1], f"{r.get('site', '')}/{r.get('qid', '')}", case))

    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            flush()
            batch = []
            if limit is not None and len(pairs) >= limit:
                break
    if batch:
        flush()
    return FitPairs(pairs, counts)


def fit_prompts(tok, questions: list[str], max_length: int,
                min_question_tokens: int = MIN_QUESTION_TOKENS) -> tuple[list[list[int]], list[str], dict[str, int]]:
    """Prompt ids ``format_prompt(q')`` within ``max_length`` tokens, the question shortened (its start
    kept, then ``QUESTION_MARKER``) where needed. Returns (ids, the questions as used, counts: whole,
    question_cut, dropped = prompts that cannot fit even with ``min_question_tokens``)."""
    encs = _encode(tok, [format_prompt(q) for q in questions])
    ids, used, counts = [], [], {"whole": 0, "question_cut": 0, "dropped": 0}
    m = len(tok(QUESTION_MARKER, add_special_tokens=False)["input_ids"])
    for q, e in zip(questions, encs):
        if len(e.ids) <= max_length:
            ids.append(e.ids)
            used.append(q)
            counts["whole"] += 1
            continue
        q0 = len("Question: ")
        q_tokens = sum(q0 < end <= q0 + len(q) for end in e.ends)
        keep = max_length - (len(e.ids) - q_tokens) - m
        qc = None
        while keep >= min(min_question_tokens, q_tokens):
            qc = _cut_question(q, _prefix_chars(e, q0, q0 + len(q), keep) - q0)
            new = tok(format_prompt(qc))["input_ids"]
            if len(new) <= max_length:
                break
            keep -= len(new) - max_length
            qc = None
        if qc is None:
            counts["dropped"] += 1
            continue
        ids.append(list(new))
        used.append(qc)
        counts["question_cut"] += 1
    return ids, used, counts


def fit_summary(counts: dict[str, int]) -> str:
    """``counts`` of ``fit_pairs`` as one phrase: "whole 513, question cut 450, answer cut 477, dropped 0 of 1440"."""
    return ", ".join(f"{c.replace('_', ' ')} {counts[c]}" for c in CASES) + f" of {counts['total']}"
