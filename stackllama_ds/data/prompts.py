"""RL prompts: the distinct questions of a split as prompt token ids, and the order PPO visits them."""

from __future__ import annotations

import array
import functools
import random
from typing import NamedTuple

from stackllama_ds.config import RunConfig
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.data.template import format_prompt
from stackllama_ds.runtime import TrainingError, data_dir


class Prompts(NamedTuple):
    questions: list[str]
    ids: list[list[int]]  # prompt token ids, ``format_prompt(question)`` with special tokens
    counts: dict  # n_requested (None: all), n_available, n_too_long, n_prompts


def load_prompts(cfg: RunConfig, tok, split: str, limit: int | None = None) -> Prompts:
    """The distinct questions of ``split`` (first row of each (site, qid), in split order) whose prompt
    fits ``ppo.max_prompt_length`` tokens, the first ``limit`` of them; too-long prompts are counted."""
    rows = load_prepared(data_dir(cfg))[split].select_columns(["site", "qid", "question"])
    seen, questions = set(), []
    for row in rows:
        if (row["site"], row["qid"]) not in seen:
            seen.add((row["site"], row["qid"]))
            questions.append(row["question"])
    ids = tok([format_prompt(q) for q in questions], add_special_tokens=True)["input_ids"]
    L = cfg.ppo.max_prompt_length
    fits = [i for i, x in enumerate(ids) if len(x) <= L]
    keep = fits if limit is None else fits[:limit]
    if not keep:
        raise TrainingError(f"no {split} prompt fits ppo.max_prompt_length={L} tokens ({len(ids)} prompts, "
                            f"shortest {min((len(x) for x in ids), default=0)} tokens)")
    counts = {"n_requested": limit, "n_available": len(questions), "n_too_long": len(ids) - len(fits),
              "n_prompts": len(keep)}
    return Prompts([questions[i] for i in keep], [ids[i] for i in keep], counts)


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
