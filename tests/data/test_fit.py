"""Over-length texts: the question is cut, not the answers (data.fit), on real pairs and by hand."""

from __future__ import annotations

import pytest

from stackllama_ds.data.fit import CASES, MIN_QUESTION_TOKENS, QUESTION_MARKER, fit_pairs, fit_prompts
from stackllama_ds.data.template import format_prompt, format_qa
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def tok(prepared_root):
    from stackllama_ds.models.load import load_tokenizer

    return load_tokenizer(prepared_root / "tiny", padding_side="right")


@pytest.fixture(scope="module")
def ten_sites(tmp_path_factory):
    from stackllama_ds.config import DataConfig
    from stackllama_ds.data.prepare import load_prepared, prepare

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    out = tmp_path_factory.mktemp("ten") / "data"
    prepare(SHARED_DATA, out, cfg=DataConfig(posts=str(SHARED_DATA)), seed=0, log=lambda *a, **k: None)
    return load_prepared(out)


def _answer_tokens(tok, q: str, a: str) -> tuple[list[int], int]:
    """(ids of the whole text, tokens that end after the prompt) with no cut."""
    enc = tok(format_qa(q, a), return_offsets_mapping=True)
    start = len(format_prompt(q))
    return list(enc["input_ids"]), sum(e > start for _, e in enc["offset_mapping"])


def _check_real_pairs(tok, rows, L: int) -> dict:
    c = fit_pairs(rows, tok, L).counts
    assert c["total"] == len(rows) == sum(c[k] for k in CASES)
    assert c["question_cut"] > 0 and c["answer_cut"] > 0  # the limit bites on these sites
    for r in rows:  # one pair at a time: which row each kept pair came from is then known
        res = fit_pairs([r], tok, L)
        if not res.pairs:
            assert res.counts["dropped"] == 1
            continue
        p = res.pairs[0]
        assert p.group == f"{r['site']}/{r['qid']}"
        assert len(p.chosen) <= L and len(p.rejected) <= L
        assert p.chosen.tolist() != p.rejected.tolist()  # no pair of identical texts is kept
        for ids, n_ans, a in ((p.chosen, p.len_chosen, r["response_j"]), (p.rejected, p.len_rejected, r["response_k"])):
            full, n_full = _answer_tokens(tok, r["question"], a)
            if p.case in ("whole", "question_cut"):
                assert ids[-n_ans:].tolist() == full[-n_full:] and n_ans == n_full  # the answer whole
            elif ids[-1] != full[-1]:  # cut: only an answer that does not fit behind the shortest question
                assert p.case == "answer_cut"
                assert n_full > L - (len(ids) - n_ans) - 1
    return c


def test_real_pairs_keep_their_answers(tok, ten_sites):
    rows = list(ten_sites["rm_train"].select_columns(["site", "qid", "question", "response_j", "response_k"]))
    c = _check_real_pairs(tok, rows, 320)
    assert c["whole"] < c["total"]


def test_question_cut_keeps_its_start_and_both_sides_share_it(tok):
    q = "How long can I keep beer?\n\n" + " ".join(f"detail{i}" for i in range(300))
    rows = [{"site": "s", "qid": 1, "question": q, "response_j": "Six months in a cold cellar.",
             "response_k": "A week at most, it goes stale quickly."}]
    L = 96
    (p,), c = fit_pairs(rows, tok, L)
    assert (c["question_cut"], c["total"]) == (1, 1) and p.case == "question_cut"
    text_j, text_k = (tok.decode(x, skip_special_tokens=True) for x in (p.chosen, p.rejected))
    assert text_j.endswith("Answer: Six months in a cold cellar.")
    assert text_k.endswith("Answer: A week at most, it goes stale quickly.")
    q_j, q_k = (t.split("\n\nAnswer: ")[0] for t in (text_j, text_k))
    assert q_j == q_k and q_j.startswith("Question: How long can I keep beer?") and q_j.endswith(QUESTION_MARKER)
    assert max(len(p.chosen), len(p.rejected)) <= L and max(len(p.chosen), len(p.rejected)) >= L - 4  # no waste
    alone = tok("Six months in a cold cellar.", add_special_tokens=False)["input_ids"]
    assert abs(p.len_chosen - len(alone)) <= 1


def test_answer_cut_only_past_the_minimum_question_and_identical_pairs_dropped(tok):
    long_a = " ".join(f"word{i}" for i in range(400))
    rows = [
        {"site": "s", "qid": 1, "question": "Q " * 200, "response_j": long_a, "response_k": "short"},
        # the two answers differ only after the cut: identical texts, dropped
        {"site": "s", "qid": 2, "question": "Why?", "response_j": long_a + " yes", "response_k": long_a + " no"},
        {"site": "s", "qid": 3, "question": "Why?", "response_j": "a", "response_k": "b"},
    ]
    res = fit_pairs(rows, tok, 128)
    assert res.counts == {"total": 3, "whole": 1, "question_cut": 0, "answer_cut": 1, "dropped": 1}
    p = res.pairs[0]
    assert p.case == "answer_cut" and len(p.chosen) <= 128
    q_tokens = len(p.chosen) - p.len_chosen
    assert q_tokens >= MIN_QUESTION_TOKENS  # the question keeps its minimum
    assert tok.decode(p.rejected, skip_special_tokens=True).endswith("Answer: short")
    # filter: StackLLaMA's rule drops the over-length pairs instead
    f = fit_pairs(rows, tok, 128, "filter")
    assert f.counts == {"total": 3, "whole": 1, "question_cut": 0, "answer_cut": 0, "dropped": 2}
    assert [x.group for x in f.pairs] == ["s/3"]


def test_prompts_keep_the_question_start(tok):
    qs = ["Short one?", "Long one?\n\n" + "more text " * 300]
    ids, used, c = fit_prompts(tok, qs, 64)
    assert c == {"whole": 1, "question_cut": 1, "dropped": 0}
    assert used[0] == qs[0] and used[1].startswith("Long one?") and used[1].endswith(QUESTION_MARKER)
    assert all(len(x) <= 64 for x in ids) and len(ids[1]) >= 60
    assert ids[1] == tok(format_prompt(used[1]))["input_ids"]
    assert tok.decode(ids[1], skip_special_tokens=True).endswith("\n\nAnswer: ")


@pytest.mark.slow
def test_real_pairs_keep_their_answers_smollm2(smollm2_dir, ten_sites):
    from stackllama_ds.models.load import load_tokenizer

    rows = list(ten_sites["rm_eval"].select_columns(["site", "qid", "question", "response_j", "response_k"]))
    _check_real_pairs(load_tokenizer(smollm2_dir, padding_side="right"), rows, 320)
