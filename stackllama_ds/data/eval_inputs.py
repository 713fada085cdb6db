"""Held-out inputs of evaluation: answer texts for the LM loss and preference pairs for the RM."""

from __future__ import annotations

from stackllama_ds.config import RunConfig
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


def load_rm_pairs(cfg: RunConfig, tok) -> tuple[list[tuple[list[int], list[int], int, int]], dict]:
    """The first eval.n_rm_pairs rm_eval pairs (chosen ids, rejected ids, chosen length, rejected
    length) under the RM stage's max_length policy; lengths are answer tokens before any cut."""
    split, rc, n = load_prepared(data_dir(cfg))["rm_eval"], cfg.rm, cfg.eval.n_rm_pairs
    pairs, over = [], 0
    for b in split.select_columns(["question", "response_j", "response_k"]).iter(batch_size=256):
        if len(pairs) == n:
            break
        chosen = tok([format_qa(q, a) for q, a in zip(b["question"], b["response_j"])])["input_ids"]
        rejected = tok([format_qa(q, a) for q, a in zip(b["question"], b["response_k"])])["input_ids"]
        lc = [len(x) for x in tok(b["response_j"], add_special_tokens=False)["input_ids"]]
        lr = [len(x) for x in tok(b["response_k"], add_special_tokens=False)["input_ids"]]
        for j, k, a, r in zip(chosen, rejected, lc, lr):
            if len(pairs) == n:
                break
            if len(j) > rc.max_length or len(k) > rc.max_length:
                over += 1
                if rc.overlength == "filter":
                    continue
            pairs.append((j[: rc.max_length], k[: rc.max_length], a, r))
    counts = {"split": "rm_eval", "n_requested": n, "n_available": len(split), "max_length": rc.max_length,
              "overlength": rc.overlength, "n_over_length": over, "n_pairs": len(pairs), "length_unit": "tokens"}
    return pairs, counts
