"""RL prompts: the distinct questions of a split as prompt token ids, and the order PPO visits them."""

from __future__ import annotations

import array
import functools
import os
import random
from typing import NamedTuple

from stackllama_ds.data.fit import fit_prompts
from stackllama_ds.data.prepare import load_prepared


class Prompts(NamedTuple):
    questions: list[str]
    ids: list[list[int]]  # prompt token ids, ``format_prompt(question)`` with special tokens
    counts: dict  # n_requested (None: all), n_available, n_too_long, n_question_cut, n_prompts


def load_prompts(data_dir: str | os.PathLike[str], tok, split: str, max_length: int,
                 limit: int | None = None) -> Prompts:
    """The distinct questions of ``split`` (first row of each (site, qid), in split order) as prompts of
    at most ``max_length`` tokens (``ppo.max_prompt_length``), the first ``limit`` of them. A longer question is cut to
    fit, its start kept (``data.fit``); ``questions`` are the texts as prompted. Counts: n_question_cut,
    and n_too_long for a prompt that cannot fit even then (left out)."""
    rows = load_prepared(data_dir)[split].select_columns(["site", "qid", "question"])
    seen, questions = set(), []
    for row in rows:
        if (row["site"], row["qid"]) not in seen:
            seen.add((row["site"], row["qid"]))
            questions.append(row["question"])
    L = max_length
    ids, used, fc = fit_prompts(tok, questions, L)
    keep = len(ids) if limit is None else min(limit, len(ids))
    if not keep:
        raise ValueError(f"no {split} prompt fits ppo.max_prompt_length={L} tokens ({len(questions)} prompts, "
                            f"none fits even with its question cut)")
    counts = {"n_requested": limit, "n_available": len(questions), "n_too_long": fc["dropped"],
              "n_question_cut": fc["question_cut"], "n_prompts": keep}
    return Prompts(used[:keep], ids[:keep], counts)


@functools.lru_cache(maxsize=2)  # this pass and the next: a batch may straddle the boundary
def prompt_order(n: int, epoch: int, seed: int) -> array.array:
    """Pass ``epoch``'s shuffled order of the n prompts, the same on every rank; read-only (cached)."""
    order = list(range(n))
    random.Random(f"{seed}-prompts-{epoch}").shuffle(order)
    return array.array("q", order)  # 8 B per prompt, not a list of int objects


def prompt_batch(n: int, start: int, batch: int, rank: int, world: int, seed: int) -> list[int]:
    """This rank's prompt indices for the rollout that starts at global prompt ``start``.

    Global prompt g is ``prompt_order(n, g // n, seed)[g % n]``; the order is shuffled once per pass.
    """
    out = []
    for g in range(start + rank * batch, start + (rank + 1) * batch):
        epoch, i = divmod(g, n)
        out.append(prompt_order(n, epoch, seed)[i])
    return out
