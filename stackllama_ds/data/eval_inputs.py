"""Held-out inputs of evaluation: answer texts for the LM loss and preference pairs for the RM."""

from __future__ import annotations

import os

from stackllama_ds.data.fit import FitPairs, fit_pairs
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.data.template import format_prompt, format_qa

LM_SPLITS = ("rl_eval", "rm_eval")  # held-out questions: no stage trains on them


def load_lm_texts(data_dir: str | os.PathLike[str], tok, max_length: int,
                  n: int | None) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """The first ``n`` held-out (ids, answer-token mask) texts of at most ``max_length`` tokens
    (``sft.seq_length``, ``eval.n_lm_texts``) for the LM loss, and counts (see EVAL_JSON_KEYS `lm`).

    A token is an answer token when its text ends after the prompt ``Question: q\\n\\nAnswer: `` (so
    " Beer", which carries the prompt's last space, is one); the EOS that follows the text is one too.
    """
    data, L = load_prepared(data_dir), max_length
    seen, texts, too_long = set(), [], 0
    for name in LM_SPLITS:
        for row in data[name].select_columns(["site", "qid", "question", "response_j"]):
            if len(texts) == n:
                break
            if (row["site"], row["qid"]) in seen:
                continue
            seen.add((row["site"], row["qid"]))
            start = len(format_prompt(row["question"]))
            enc = tok(format_qa(row["question"], row["response_j"]), truncation=True, max_length=L,
                      return_offsets_mapping=True)
            ids, target = list(enc["input_ids"]), [int(end > start) for _, end in enc["offset_mapping"]]
            if len(ids) < L:
                ids, target = ids + [tok.eos_token_id], target + [1]
            target[0] = 0  # nothing predicts the first token
            if sum(target) == 0:
                too_long += 1
                continue
            texts.append((ids, target))
    counts = {"splits": list(LM_SPLITS), "tokens": "answer", "max_length": L, "n_requested": n,
              "n_too_long": too_long, "n_texts": len(texts), "n_tokens": sum(sum(t) for _, t in texts)}
    return texts, counts


def load_rm_pairs(data_dir: str | os.PathLike[str], tok, max_length: int, overlength: str,
                  n: int | None) -> FitPairs:
    """The held-out preference pairs: the first ``n`` (``eval.n_rm_pairs``) of rm_eval (all when None)
    that survive ``data.fit`` at ``max_length`` / ``overlength`` (``rm.max_length`` / ``rm.overlength``). The RM stage's held-out figures
    and `eval`'s are taken on exactly these pairs. Lengths are answer tokens as scored (after any cut).
    ``counts``: the split, sizes, and ``truncation`` (whole / question_cut / answer_cut / dropped)."""
    split = load_prepared(data_dir)["rm_eval"]
    fp = fit_pairs(split.select_columns(["site", "qid", "question", "response_j", "response_k"]), tok,
                   max_length, overlength, limit=n)
    counts = {"split": "rm_eval", "n_requested": n, "n_available": len(split), "max_length": max_length,
              "overlength": overlength, "n_pairs": len(fp.pairs), "length_unit": "answer tokens as scored",
              "truncation": fp.counts}
    return FitPairs(fp.pairs, counts)
