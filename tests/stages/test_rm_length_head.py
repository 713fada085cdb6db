"""ODIN's length-disentangled reward model (``rm.length_head``) and the fp32 score head.

    python -m pytest tests/stages/test_rm_length_head.py -q -x

The loss terms against hand-computed values; the score head's fp32 matmul under a bf16 model; a tiny
two-head reward model trained through the stage's loss, exported and read back by
``pipeline("text-classification")``; every consumer reading column 0 (the quality head). One slow
2-rank run of ``stackllama-ds rm`` with LoRA under ZeRO-3 in bf16 checks the stage end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stackllama_ds import rl
from stackllama_ds.config import LoraConfig, ModelConfig, RMConfig

TINY = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4}
LORA = {"enabled": True, "r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _pearson_by_hand(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


# ------------------------------------------------------------------------------ the loss terms
def test_pearson_by_hand_and_zero_variance_without_nan():
    x, y = [1.0, 2.0, 4.0, 7.0], [10.0, 30.0, 20.0, 60.0]
    # centred x = [-2.5, -1.5, 0.5, 3.5], y = [-20, 0, -10, 30]: 150 / sqrt(21 * 1400)
    assert _pearson_by_hand(x, y) == pytest.approx(150 / math.sqrt(21 * 1400))
    assert rl.pearson(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(150 / math.sqrt(21 * 1400), rel=1e-6)
    # scale and shift free, sign kept
    assert rl.pearson(torch.tensor(x) * 3 + 1, -torch.tensor(y)).item() == pytest.approx(-150 / math.sqrt(21 * 1400),
                                                                                          rel=1e-6)
    # every length equal, or a constant score: rho 0 and finite (zero) gradients, not 0/0
    for a, b in ((torch.tensor(x), torch.full((4,), 5.0)), (torch.full((4,), 0.3), torch.tensor(y))):
        a = a.clone().requires_grad_(True)
        rho = rl.pearson(a, b)
        rho.backward()
        assert rho.item() == 0.0 and torch.isfinite(a.grad).all()
    a = torch.full((4,), 0.3, requires_grad=True)
    rl.pearson(a, torch.full((4,), 9.0)).backward()
    assert a.grad.tolist() == [0.0] * 4


def test_odin_penalty_by_hand():
    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r_len = torch.tensor([0.1, 0.2, 0.3, 0.4], requires_grad=True)  # rho(r_L, len) = 1
    r_q = torch.tensor([3.0, 1.0, 2.0, 2.0], requires_grad=True)  # centred [1, -1, 0, 0] . [-1.5, -.5, .5, 1.5]
    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], requires_grad=True)  # cos = 1 / sqrt(2)
    rho_q = -1.0 / math.sqrt(2 * 5)  # cov -1 over sqrt(2 * 5)
    assert _pearson_by_hand([3, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(rho_q)
    pen, st = rl.odin_penalty(r_q, r_len, lengths, w, length_corr_weight=0.5, quality_corr_weight=2.0,
                              ortho_weight=3.0)
    by_hand = 0.5 * -1.0 + 2.0 * abs(rho_q) + 3.0 / math.sqrt(2)
    assert pen.item() == pytest.approx(by_hand, rel=1e-6)
    assert st.corr_length.item() == pytest.approx(1.0, rel=1e-6)
    assert st.corr_quality.item() == pytest.approx(rho_q, rel=1e-6)
    assert st.ortho.item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert st.penalty.item() == pytest.approx(by_hand, rel=1e-6) and not st.penalty.requires_grad
    pen.backward()
    # |rho_Q| pushed towards 0: its gradient is -sign(rho_Q) * d rho_Q; the cosine's gradient is orthogonal
    # to its own row (it does not depend on the row's norm)
    assert r_q.grad.abs().sum() > 0 and w.grad is not None
    assert (w.grad * w.detach()).sum(1).abs().max().item() < 1e-6
    # each weight alone
    for lam, want in (((1, 0, 0), -1.0), ((0, 1, 0), abs(rho_q)), ((0, 0, 1), 1 / math.sqrt(2))):
        p, _ = rl.odin_penalty(r_q, r_len, lengths, w, *lam)
        assert p.item() == pytest.approx(want, rel=1e-6)


def test_length_head_needs_two_pairs_per_micro_batch():
    from pydantic import ValidationError

    RMConfig(length_head=True, engine={"micro_batch_size": 2})
    with pytest.raises(ValidationError, match="length_head needs engine.micro_batch_size >= 2"):
        RMConfig(length_head=True, engine={"micro_batch_size": 1})
    with pytest.raises(ValidationError):
        RMConfig(length_head=True, ortho_weight=-1.0)
    assert RMConfig().length_head is False  # the StackLLaMA default


def test_shipped_configs_length_head():
    from stackllama_ds.config_loader import load_config
    from tests.conftest import REPO

    # smollm2.yaml: the sweep's best row has one head (bench/RESULTS.md, issue 23); the 7B run has none
    assert load_config(REPO / "configs" / "smollm2.yaml", check_files=False).rm.length_head is False
    assert load_config(REPO / "configs" / "stackllama.yaml", check_files=False).rm.length_head is False


def test_pair_figures_by_hand():
    from stackllama_ds.evaluation.stats import pair_figures
    from stackllama_ds.evaluation.summary import head_figures

    f = pair_figures([2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [3, 1, 2], [1, 4, 2])
    # wins, loss, tie -> 1.5 / 3; adversarial: pair 1 only (1 < 4) -> lost; the 6 answers' ranks
    assert f["accuracy"] == pytest.approx(0.5) and f["adversarial_accuracy"] == 0.0 and f["n_adversarial"] == 1
    assert f["length_spearman"] == pytest.approx(_pearson_by_hand([6, 1, 3.5, 3.5, 3.5, 3.5],
                                                                  [5, 1.5, 3.5, 1.5, 6, 3.5]))
    assert math.isnan(pair_figures([1.0], [0.0], [5], [5])["adversarial_accuracy"])
    # two heads: quality = column 0, length = column 1, sum; NaN written as None
    h = head_figures([[2.0, 0.0], [0.0, 5.0]], [[1.0, 1.0], [1.0, 0.0]], [3, 1], [1, 4])
    assert list(h) == ["quality", "length", "sum"]
    # quality 2 > 1, 0 < 1; length 0 < 1, 5 > 0; sum 2 = 2 (a tie: half), 5 > 1
    assert h["quality"]["accuracy"] == 0.5 and h["length"]["accuracy"] == 0.5 and h["sum"]["accuracy"] == 0.75
    assert h["quality"]["adversarial_accuracy"] == 0.0 and h["length"]["adversarial_accuracy"] == 1.0
    assert list(head_figures([[1.0]], [[0.0]], [2], [2])) == ["quality"]
    assert head_figures([[1.0]], [[0.0]], [2], [2])["quality"]["adversarial_accuracy"] is None
    # eval.json's rm section: the heads beside the quality-head figures, from the per-pair rows
    from stackllama_ds.evaluation.summary import summarize_rm

    rows = [{"chosen": c[0], "rejected": r[0], "len_chosen": a, "len_rejected": b, "chosen_heads": c,
             "rejected_heads": r} for c, r, a, b in zip([[2.0, 0.0], [0.0, 5.0]], [[1.0, 1.0], [1.0, 0.0]], [3, 1], [1, 4])]
    s = summarize_rm(rows, 20, 0)
    assert s["heads"] == h and s["accuracy"]["mean"] == h["quality"]["accuracy"]
    assert "heads" not in summarize_rm([{k: v for k, v in x.items() if "heads" not in k} for x in rows], 20, 0)


def test_report_tabulates_heads():
    from stackllama_ds.evaluation.report import _rm_head_lines
    from stackllama_ds.evaluation.summary import head_figures

    h = head_figures([[2.0, 0.0], [0.0, 5.0]], [[1.0, 1.0], [1.0, 0.0]], [3, 1], [1, 4])
    rows = [line.split(" | ") for line in _rm_head_lines(h) if line.startswith("| ") and "---" not in line][1:]
    assert [r[0] for r in rows] == ["| quality", "| length", "| sum"]
    assert [(float(r[1]), r[2]) for r in rows] == [(0.5, "0.000 (1)"), (0.5, "1.000 (1)"), (0.75, "1.000 (1)")]
    assert _rm_head_lines(head_figures([[1.0]], [[0.0]], [2], [2])) == []  # one head: the table above says it all


# -------------------------------------------------------------------------- the fp32 score head
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny causal-LM folder to start reward models from (as an SFT model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lh") / "base"
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(out)
    return out


def test_score_head_computes_in_fp32_under_bf16(base_dir, tmp_path):
    from stackllama_ds.models.load import Fp32Score, load_reward_model

    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    for lora in (None, LoraConfig(**LORA)):
        m = load_reward_model(base_dir, ModelConfig(), pad_token_id=0, dtype="bf16", num_labels=2, lora=lora)
        lm = m.get_base_model() if lora else m
        head = lm.score.modules_to_save["default"] if lora else lm.score
        assert isinstance(head, Fp32Score) and head.weight.dtype == torch.bfloat16
        assert m.config.id2label == {0: "quality", 1: "length"} and m.config.label2id == {"quality": 0, "length": 1}
        with torch.no_grad():
            out = m(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -1]  # (B, H) bf16: no pad in ids, the score is read at the last token
        assert hidden.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
        assert torch.equal(out.logits, F.linear(hidden.float(), head.weight.float()))
    # an exported reward folder keeps its two heads (num_labels from its config), a causal LM gets one
    m.merge_and_unload().save_pretrained(tmp_path / "rm")
    again = load_reward_model(tmp_path / "rm", ModelConfig(), pad_token_id=0, dtype="fp32")
    assert again.config.num_labels == 2 and isinstance(again.score, Fp32Score)
    assert torch.equal(again.score.weight, head.weight.float())
    one = load_reward_model(base_dir, ModelConfig(), pad_token_id=0)
    assert one.config.num_labels == 1 and isinstance(one.score, Fp32Score)


# ---------------------------------------------------------------- training, export and consumers
class _Engine:
    """What the RM stage's functions need of a DeepSpeed engine."""

    device = torch.device("cpu")

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


def _pairs(n: int, seed: int) -> list:
    """(chosen ids, rejected ids, chosen answer length, rejected answer length): chosen always longer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lj, lk = int(torch.randint(8, 14, (1,), generator=g)), int(torch.randint(3, 8, (1,), generator=g))
        out.append((torch.randint(1, 50, (lj,), generator=g).numpy(), torch.randint(1, 50, (lk,), generator=g).numpy(),
                    lj - 2, lk - 2))
    return out


def _two_head_setup(prepared_root):
    """A seeded two-head tiny reward model behind ``_Engine``, its pad id, and an RMConfig with unequal
    ODIN weights (so each term's weight shows in the loss)."""
    from stackllama_ds.models.load import load_reward_model, load_tokenizer

    base = prepared_root / "tiny"
    pad = load_tokenizer(base).pad_token_id
    torch.manual_seed(0)
    model = load_reward_model(base, ModelConfig(), pad_token_id=pad, num_labels=2)
    rc = RMConfig(length_head=True, length_corr_weight=0.5, quality_corr_weight=2.0, ortho_weight=3.0)
    return model, _Engine(model), pad, rc


def test_two_head_model_trains_exports_and_pipeline_reads_it(prepared_root, tmp_path):
    from transformers import pipeline

    from stackllama_ds.data.pair_batches import collate_pairs
    from stackllama_ds.models.hf_folder import export_hf
    from stackllama_ds.models.load import load_tokenizer
    from stackllama_ds.stages.rm import evaluate, head_scores, pairwise_loss, rm_loss

    model, engine, pad, rc = _two_head_setup(prepared_root)
    pairs = _pairs(4, seed=1)
    batch = collate_pairs(pairs, pad)
    assert batch["answer_lengths"].tolist() == [float(p[2]) for p in pairs] + [float(p[3]) for p in pairs]

    # the stage's loss = ranking loss on r_Q + r_L + odin_penalty, each computed here on the same scores
    loss, st, terms = rm_loss(engine, batch, rc)
    with torch.no_grad():
        r = head_scores(engine, batch)  # (2B, 2)
        rank, _ = pairwise_loss(r[:4].sum(1), r[4:].sum(1))
        w = model.score.weight.float()
        pen, o = rl.odin_penalty(r[:, 0], r[:, 1], batch["answer_lengths"], w, 0.5, 2.0, 3.0)
    assert r.shape == (8, 2)
    assert loss.item() == pytest.approx((rank + pen).item(), rel=1e-5)
    assert terms == pytest.approx({"loss_rank": rank.item(), "corr_length": o.corr_length.item(),
                                   "corr_quality": o.corr_quality.item(), "ortho": o.ortho.item()}, rel=1e-5)
    assert st.margins.tolist() == pytest.approx((r[:4].sum(1) - r[4:].sum(1)).tolist(), rel=1e-5)
    loss.backward()
    assert (model.score.weight.grad.abs().sum(1) > 0).all()  # both heads get gradient
    # without the length head: the ranking loss alone, no terms
    plain = RMConfig()
    loss_plain, _, none = rm_loss(engine, batch, plain)
    assert none == {} and loss_plain.item() == pytest.approx(rank.item(), rel=1e-5)

    # a few steps on these pairs (chosen always longer): the loss falls, the length head follows length
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        opt.zero_grad()
        loss, _, terms = rm_loss(engine, batch, rc)
        loss.backward()
        opt.step()
        first = first if first is not None else (loss.item(), terms)
    assert loss.item() < first[0]
    assert terms["corr_length"] > first[1]["corr_length"] and terms["corr_length"] > 0.5

    # held-out figures per head, over the pairs with weight 1 (the weight-0 row is shard padding)
    ev = evaluate(engine, [(collate_pairs(pairs[:3] + pairs[:1], pad), torch.tensor([1.0, 1.0, 1.0, 0.0]))], 0.0)
    assert ev["n_pairs"] == 3 and ev["n_adversarial"] == 0  # chosen never shorter
    assert {"quality_accuracy", "length_accuracy", "sum_accuracy", "quality_length_spearman",
            "length_length_spearman", "sum_length_spearman", "quality_adversarial_accuracy"} <= set(ev)
    assert ev["sum_accuracy"] == ev["accuracy"] and ev["quality_adversarial_accuracy"] is None

    # export: a two-label sequence classifier that pipeline("text-classification") reads
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = export_hf("reward", sd, prepared_root / "tiny", tmp_path / "rm", ModelConfig(), None, dtype="fp32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "quality", "1": "length"} and cfg["label2id"] == {"quality": 0, "length": 1}
    clf = pipeline("text-classification", model=str(out), tokenizer=str(out), device="cpu")
    text = "Question: Which hops?\n\nAnswer: Cascade."
    got = clf(text, top_k=None, function_to_apply="none")
    assert sorted(g["label"] for g in got) == ["length", "quality"]
    tok = load_tokenizer(out)
    with torch.no_grad():
        want = model.eval()(**tok(text, return_tensors="pt")).logits[0]
    by_label = {g["label"]: g["score"] for g in got}
    assert [by_label["quality"], by_label["length"]] == pytest.approx(want.tolist(), abs=1e-5)


def test_packed_batch_gives_the_padded_loss_terms_and_grads(prepared_root):
    """``rm.packed``: the stage's loss, ODIN's terms, the (2B, 2) scores and every gradient of one packed row
    (pairs sharing a question) equal those of the padded rows (fp32, 1e-5), and eval's figures too."""
    from stackllama_ds.data.packed_pairs import pack_pairs
    from stackllama_ds.data.pair_batches import collate_pairs
    from stackllama_ds.stages.rm import evaluate, head_scores, rm_loss

    model, engine, pad, rc = _two_head_setup(prepared_root)
    pairs = [(q + c[2:].tolist(), q + k[2:].tolist(), lc, lk) for (c, k, lc, lk), q in zip(_pairs(4, seed=2), ([5, 6, 7], [9], [], [8, 8]))]
    out = {}
    for name, batch in (("packed", pack_pairs(pairs)), ("padded", collate_pairs(pairs, pad))):
        model.zero_grad(set_to_none=True)
        loss, st, terms = rm_loss(engine, batch, rc)
        loss.backward()
        with torch.no_grad():
            r = head_scores(engine, batch)
        ev = evaluate(engine, [(batch, torch.tensor([1.0, 1.0, 0.0, 1.0]))], 0.0)
        out[name] = (loss.item(), terms, r, {n: p.grad.clone() for n, p in model.named_parameters()}, ev)
    (lp, tp, rp, gp, ep), (ld, td, rd, gd, ed) = out["packed"], out["padded"]
    assert r.shape == (8, 2) and lp == pytest.approx(ld, rel=1e-5) and tp == pytest.approx(td, rel=1e-5)
    torch.testing.assert_close(rp, rd, atol=1e-5, rtol=1e-5)
    for n in gd:
        torch.testing.assert_close(gp[n], gd[n], atol=1e-5, rtol=1e-5, msg=n)
    assert ep.keys() == ed.keys() and all(ep[k] == pytest.approx(ed[k], rel=1e-5) for k in ed if ed[k] is not None)


def test_lora_two_head_export_keeps_both_rows(prepared_root, tmp_path):
    from stackllama_ds.models.hf_folder import export_hf, score_rows
    from stackllama_ds.models.load import load_reward_model, load_tokenizer

    base = prepared_root / "tiny"
    pad = load_tokenizer(base).pad_token_id
    lora = LoraConfig(**LORA)
    torch.manual_seed(0)
    model = load_reward_model(base, ModelConfig(), pad_token_id=pad, num_labels=2, lora=lora)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    trained = next(v for k, v in sd.items() if k.endswith("score.modules_to_save.default.weight"))
    assert trained.shape[0] == 2 and score_rows(sd) == 2
    out = export_hf("reward", sd, base, tmp_path / "rm", ModelConfig(), lora, dtype="fp32")
    merged = load_reward_model(out, ModelConfig(), pad_token_id=pad)
    assert merged.config.id2label == {0: "quality", 1: "length"}
    assert torch.equal(merged.score.weight, trained)
    with pytest.raises(RuntimeError, match="one trained score weight"):
        score_rows({"score.weight": torch.zeros(1, 4), "x.score.modules_to_save.default.weight": torch.zeros(2, 4)})


def test_consumers_read_the_quality_column(prepared_root):
    from stackllama_ds.models.load import TokenValueModel, load_reward_model, load_tokenizer
    from stackllama_ds.models.scoring import reward_head_scores, reward_scores
    from stackllama_ds.stages.eval import pair_scores

    base = prepared_root / "tiny"
    tok = load_tokenizer(base, padding_side="right")
    torch.manual_seed(0)
    rm = load_reward_model(base, ModelConfig(), pad_token_id=tok.pad_token_id, num_labels=2).eval()
    with torch.no_grad():
        rm.score.weight[1] += 5.0  # a length head far from the quality head
    qs, rs = ["Which hops?", "Stout or porter?"], ["Cascade.", "Porter, brewed dark and strong."]
    heads = reward_head_scores(rm, tok, qs, rs, torch.device("cpu"))  # (B, 2)
    assert heads.shape == (2, 2) and not torch.allclose(heads[:, 0], heads[:, 1])
    assert torch.equal(reward_scores(rm, tok, qs, rs, torch.device("cpu")), heads[:, 0])  # PPO, eval, ask
    pairs = _pairs(3, seed=2)
    rc, rr = pair_scores(rm, pairs, tok.pad_token_id)  # eval's held-out pairs: every head, column 0 first
    assert len(rc) == 3 and all(len(x) == 2 for x in rc + rr)
    with torch.no_grad():
        alone = rm(input_ids=torch.as_tensor(pairs[0][0], dtype=torch.long)[None]).logits[0]
    assert rc[0] == pytest.approx(alone.tolist(), abs=1e-5)
    # a critic initialised from a two-head reward model: values are the quality head on every token
    critic = TokenValueModel(rm)
    ids = torch.as_tensor(pairs[0][0], dtype=torch.long)[None]
    with torch.no_grad():
        v = critic(ids, torch.ones_like(ids))  # (1, T)
    assert v.shape == ids.shape and v[0, -1].item() == pytest.approx(alone[0].item(), abs=1e-5)


# ------------------------------------------------------------------------- the stage, 2 ranks
@pytest.mark.slow
def test_rm_stage_length_head_lora_zero3_bf16(prepared_root, tmp_path_factory):
    """``stackllama-ds rm`` with a length head, LoRA, partitioned ZeRO-3, bf16: metrics rows carry
    ODIN's terms, accuracy.json the per-head figures, the export is a two-label classifier."""
    from transformers import pipeline

    from stackllama_ds.run.metrics import read_metrics
    from tests.conftest import run_cli
    from tests.stages.test_rm import make_synthetic, synth_root

    data = make_synthetic(tmp_path_factory.mktemp("lhsynth") / "data")
    root, cfg = synth_root(prepared_root, data, tmp_path_factory.mktemp("lhrun") / "r", max_steps=4, eval_every=2,
                           save_every=4, max_length=64, overlength="truncate", lora=LORA, length_head=True,
                           engine={"zero_stage": 3, "dtype": "bf16", "micro_batch_size": 4,
                                   "stage3_param_persistence_threshold": 0})
    r = run_cli("rm", cfg)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(root / "rm" / "metrics.jsonl")
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    for x in rows:
        assert math.isfinite(x["loss"]) and -1 <= x["corr_length"] <= 1 and -1 <= x["corr_quality"] <= 1
        assert 0 <= x["ortho"] <= 1 and math.isfinite(x["loss_rank"])
    acc = json.loads((root / "rm" / "accuracy.json").read_text())
    assert acc["n_pairs"] == 23
    for head in ("quality", "length", "sum"):
        assert 0 <= acc[f"{head}_accuracy"] <= 1 and -1 <= acc[f"{head}_length_spearman"] <= 1
    assert acc["sum_accuracy"] == pytest.approx(acc["accuracy"])
    assert rows[-1]["eval_quality_accuracy"] == acc["quality_accuracy"]
    out = root / "rm" / "model"
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "quality", "1": "length"}
    got = pipeline("text-classification", model=str(out), device="cpu")("Question: Ale?\n\nAnswer: Dark.", top_k=None)
    assert sorted(g["label"] for g in got) == ["length", "quality"]
