"""Held-out inputs of evaluation: answer texts for the LM loss and preference pairs for the RM."""

from __future__ import annotations

from stackllama_ds.config import RunConfig
from stackllama_ds.data.fit import FitPairs, fit_pairs
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.data.template import format_prompt, format_qa
from stackllama_ds.runtime import data_dir

LM_SPLITS = ("rl_eval", "rm_eval")  # held-out questions: no stage trains on them


def load_lm_texts(cfg: RunConfig, tok) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Held-out (ids, answer-token mask) texts for the LM loss, and counts (see EVAL_JSON_KEYS `lm`).

    A token is an answer token when its text ends after the prompt ``Question: q\\n\\nAnswer: `` (so
    " Beer", which carries the prompt's last space, is one); the EOS that follows the text is one too.
    """
    data, L, n = load_prepared(data_dir(cfg)), cfg.sft.seq_length, cfg.eval.n_lm_texts
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


def load_rm_pairs(cfg: RunConfig, tok) -> FitPairs:
    """The held-out preference pairs: the first ``eval.n_rm_pairs`` of rm_eval (all when None) that
    survive ``data.fit`` at ``rm.max_length`` / ``rm.overlength``. The RM stage's held-out figures
    and `eval`'s are taken on exactly these pairs. Lengths are answer tokens as scored (after any cut).
    ``counts``: the split, sizes, and ``truncation`` (whole / question_cut / answer_cut / dropped)."""
    split, rc, n = load_prepared(data_dir(cfg))["rm_eval"], cfg.rm, cfg.eval.n_rm_pairs
    fp = fit_pairs(split.select_columns(["site", "qid", "question", "response_j", "response_k"]), tok,
                   rc.max_length, rc.overlength, limit=n)
    counts = {"split": "rm_eval", "n_requested": n, "n_available": len(split), "max_length": rc.max_length,
              "overlength": rc.overlength, "n_pairs": len(fp.pairs), "length_unit": "answer tokens as scored",
              "truncation": fp.counts}
    return FitPairs(fp.pairs, counts)
