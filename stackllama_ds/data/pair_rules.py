"""Answer scores, preference pairs and question-level splits (StackLLaMA's preprocessing rules).

    python -c "from stackllama_ds.data.pair_rules import answer_score; print(answer_score(5, 5, True))"

Pure functions of their arguments: no I/O, no global random state.
"""

from __future__ import annotations

import hashlib
import math
import random

from stackllama_ds.config import SplitsConfig

SPLITS = ("sft", "rm_train", "rm_eval", "rl_train", "rl_eval")


def answer_score(score: int, upvotes: int, accepted: bool) -> int:
    """StackLLaMA's answer score.

    pm = -1                                       if Score < 0
    pm = round(log2(1 + upvotes)) + accepted      otherwise

    ``score`` is the row's Score attribute; ``upvotes`` is that same Score by default, or the count of
    VoteTypeId 2 votes from Votes.xml. ``round`` is Python's (half to even), as in the original
    preprocessing: log2(1 + 2) = 1.58 -> 2, log2(1 + 1) = 1 -> 1, round(2.5) would be 2.
    """
    if score < 0:
        return -1
    return round(math.log2(1 + upvotes)) + (1 if accepted else 0)


def make_pairs(scores: list[int], max_pairs: int, key: str) -> list[tuple[int, int]]:
    """Index pairs ``(j, k)`` with ``scores[j] > scores[k]`` over all answer pairs of one question.

    Pairs come in (i, i') order for i < i'; when there are more than ``max_pairs`` we keep a sample
    drawn by ``random.Random(key)`` (key = "seed-site-qid"), still in that order.
    """
    pairs = []
    n = len(scores)
    for i in range(n):
        si = scores[i]
        for i2 in range(i + 1, n):
            s2 = scores[i2]
            if si > s2:
                pairs.append((i, i2))
            elif s2 > si:
                pairs.append((i2, i))
    if len(pairs) > max_pairs:
        keep = sorted(random.Random(key).sample(range(len(pairs)), max_pairs))
        pairs = [pairs[i] for i in keep]
    return pairs


def pair_key(seed: int, site: str, qid: int) -> str:
    return f"{seed}-{site}-{qid}"


def split_of(seed: int, site: str, qid: int, splits: SplitsConfig) -> str:
    """The split of a question: u = blake2b("seed-site-qid") / 2^64 in [0, 1), bucketed by the shares
    in SPLITS order. Stable across runs, machines, Python versions and worker counts."""
    h = hashlib.blake2b(pair_key(seed, site, qid).encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2.0**64
    cum = 0.0
    last = SPLITS[0]
    for name in SPLITS:
        share = getattr(splits, name)
        if share <= 0:
            continue
        cum += share
        last = name
        if u < cum:
            return name
    return last  # u beyond the float sum of the shares (1 - 1e-16)
