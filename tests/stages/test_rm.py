"""Reward-model stage: the pairwise loss, pair batching, and 2-rank runs of ``stackllama-ds rm``.

    python -m pytest tests/stages/test_rm.py -q -x

Launches are shared: one fp32 run on a synthetic preference (the chosen answer always holds a
fenced code block) is both the learning test and the uninterrupted reference for the resume test;
one LoRA run under partitioned ZeRO-3 checks the merged export; ``rm_root`` is the beer sample.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, assert_resumed_at, cli_env, run_cli, write_config

WORDS = (
    "hops malt yeast stout lager ale barley wheat brew bottle keg foam bitter sweet dark pale water "
    "ferment temperature glass cellar aroma flavor carbonation sugar recipe"
).split()
SYNTH_RM = {
    "max_steps": 100,
    "eval_every": 50,
    "save_every": 10,
    "max_length": 128,
    "engine": {"zero_stage": 2, "dtype": "fp32", "micro_batch_size": 4},
}


# ------------------------------------------------------------------------------ pure functions
def test_pairwise_loss_by_hand():
    from stackllama_ds.stages.rm import pairwise_loss

    loss, st = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    by_hand = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2  # -log sigmoid(x) = log(1+e^-x)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert st.correct.tolist() == [1.0, 0.0] and st.margins.tolist() == [1.0, -1.0]

    loss, st = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), margin=0.5)
    by_hand = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.5))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert st.losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.5))])

    rj = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    loss, _ = pairwise_loss(rj, torch.zeros(3))
    loss.backward()  # d/dr_j of mean -log sigmoid(r_j) = -(1 - sigmoid(r_j)) / B
    assert rj.grad.tolist() == pytest.approx((-(1 - torch.sigmoid(rj.detach())) / 3).tolist())


class _Tok:
    """A stand-in tokenizer: one id per character, BOS 1."""

    def __call__(self, texts):
        return {"input_ids": [[1] + [ord(c) % 200 + 3 for c in t] for t in texts]}


def _split(rows):
    from datasets import Dataset

    return Dataset.from_dict({
        "question": [q for q, _, _ in rows], "response_j": [j for _, j, _ in rows],
        "response_k": [k for _, _, k in rows],
    })


def test_scores_without_padding_mask_equal_each_sequence_alone():
    """Right-padded causal batch: dropping the padding mask changes no score (the stage relies on it)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from stackllama_ds.data.pair_batches import collate_pairs
    from stackllama_ds.stages.rm import scores

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=0, num_labels=1)).eval()
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(1, 50, (n,), generator=g).numpy(), torch.randint(1, 50, (m,), generator=g).numpy())
             for n, m in ((5, 9), (12, 3), (7, 7))]
    batch = collate_pairs(pairs, pad_id=0)

    class Engine:  # what scores() needs of a DeepSpeed engine
        device = torch.device("cpu")

        def __call__(self, **kw):
            return model(**kw)

    with torch.no_grad():
        r_j, r_k = scores(Engine(), batch)
        masked = model(**batch).logits.squeeze(-1)
        alone = torch.stack([model(input_ids=torch.as_tensor(s, dtype=torch.long)[None]).logits[0, 0]
                             for s in [j for j, _ in pairs] + [k for _, k in pairs]])
    torch.testing.assert_close(torch.cat([r_j, r_k]), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=1e-5)


def test_length_groups_split_only_when_it_saves_padding():
    from stackllama_ds.models.scoring import length_groups, right_padded_scores

    # 6 rows: one forward pads to 6 x 12 = 72 tokens; the 4 shortest + 2 longest pad to 4x7 + 2x12 = 52
    g = length_groups(torch.tensor([12, 3, 7, 9, 5, 7]))
    assert [t.tolist() for t in g] == [[1, 4, 2, 5], [3, 0]]
    assert len(length_groups(torch.tensor([8, 8, 7, 8]))) == 1  # saving below 10%: one forward
    forced = length_groups(torch.tensor([8, 8, 7, 8]), groups=2)  # ZeRO-3: always two, same on every rank
    assert len(forced) == 2 and sorted(torch.cat(forced).tolist()) == [0, 1, 2, 3]
    assert len(length_groups(torch.tensor([5]), groups=2)) == 1
    # scores come back in the batch's order, each forward sees only its group's longest, grads flow
    w = torch.tensor(2.0, requires_grad=True)
    ids = torch.arange(24.0).reshape(6, 4)
    seen = []
    out = right_padded_scores(lambda x: seen.append(x.shape) or w * x.sum(1), ids, torch.tensor([4, 1, 2, 3, 2, 2]))
    assert seen == [(4, 2), (2, 4)]
    lengths_cut = torch.tensor([ids[0].sum(), ids[1, :2].sum(), ids[2, :2].sum(), ids[3].sum(), ids[4, :2].sum(),
                                ids[5, :2].sum()])
    torch.testing.assert_close(out, 2 * lengths_cut)
    out.sum().backward()
    assert w.grad == lengths_cut.sum()


def test_pair_batches_shard_and_resume():
    from stackllama_ds.data.pair_batches import pair_batches

    pairs = [([1, 10 + i], [1, 100 + i, 7]) for i in range(10)]  # chosen len 2, rejected len 3
    world, mb = 2, 2
    seen = []
    for r in range(world):
        it = pair_batches(pairs, 0, mb, r, world, seed=3)
        for _ in range(5):  # 2 passes over 10 pairs on 2 ranks
            b = next(it)
            ids, mask = b["input_ids"], b["attention_mask"]
            assert ids.shape == (2 * mb, 3)
            assert (ids[:mb, 2] == 0).all() and (mask[:mb, 2] == 0).all()  # chosen right-padded
            assert (ids[:mb, 1] + 90 == ids[mb:, 1]).all()  # row i and row B+i are the same pair
            seen += ids[:mb, 1].tolist()
    assert sorted(seen) == sorted(list(range(10, 20)) * 2)  # each pair once per pass
    # Resume: from global position 8 rank 1 continues where the uninterrupted stream is.
    full = pair_batches(pairs, 0, mb, 1, world, seed=3)
    for _ in range(2):
        next(full)
    resumed = pair_batches(pairs, 0, mb, 1, world, seed=3, start=8)
    for _ in range(3):
        assert torch.equal(next(full)["input_ids"], next(resumed)["input_ids"])


def test_eval_pair_batches_same_forwards_every_rank():
    from stackllama_ds.data.pair_batches import eval_pair_batches

    pairs = [([1, 10 + i], [1, 50 + i]) for i in range(7)]
    shards = [eval_pair_batches(pairs, 0, 2, r, 3) for r in range(3)]  # 3, 2, 2 pairs
    assert [len(s) for s in shards] == [2, 2, 2]
    counted = [
        int(b["input_ids"][i, 1]) for s in shards for b, w in s for i in range(len(w)) if w[i] == 1
    ]
    assert sorted(counted) == list(range(10, 17))
    assert eval_pair_batches([], 0, 2, 0, 2) == []


def test_missing_init_model_is_named(tmp_path):
    from stackllama_ds.config_loader import load_config
    from stackllama_ds.stages.rm import init_path

    cfg = load_config(write_config(tmp_path / "cfg.yaml", tmp_path / "run"), check_files=False)
    with pytest.raises(FileNotFoundError, match="rm.init_from is unset and the SFT model .*sft/model"):
        init_path(cfg)


# ----------------------------------------------------------------------- synthetic preference
def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_synthetic(out: Path, n_train: int = 64, n_eval: int = 23, seed: int = 0) -> Path:
    """A prepared-data folder whose chosen answers hold a fenced code block and rejected never do."""
    from datasets import Dataset, DatasetDict, Features, List, Value

    rng = random.Random(seed)
    s = Value("string")
    feats = Features({"qid": Value("int64"), "site": s, "question": s, "date": s, "metadata": List(s),
                      "response_j": s, "response_k": s, "score_j": Value("int64"), "score_k": Value("int64")})
    splits, qid = {}, 0
    for name, n in (("sft", 4), ("rm_train", n_train), ("rm_eval", n_eval), ("rl_train", 4), ("rl_eval", 4)):
        rows: dict[str, list] = {k: [] for k in feats}
        for _ in range(n):
            code = "```\n" + rng.choice(["x = brew(malt)", "print(hops)", "for b in kegs: fill(b)"]) + "\n```"
            head, tail = _sentence(rng, rng.randint(4, 10)), _sentence(rng, rng.randint(3, 8))
            for k, v in (("qid", qid), ("site", "synthetic"), ("question", _sentence(rng, 8)),
                         ("date", "2020-01-01T00:00:00"), ("metadata", ["synthetic"]),
                         ("response_j", f"{head}\n\n{code}\n\n{tail}"),
                         ("response_k", f"{head} {_sentence(rng, 4)}\n\n{tail}"), ("score_j", 2), ("score_k", 1)):
                rows[k].append(v)
            qid += 1
        splits[name] = Dataset.from_dict(rows, features=feats)
    DatasetDict(splits).save_to_disk(str(out))
    (out / "report.json").write_text(json.dumps({"synthetic": True}) + "\n")
    return out


@pytest.fixture(scope="module")
def synth_data(prepared_root, tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth") / "data")


def synth_root(prepared_root: Path, synth_data: Path, dest: Path, **rm) -> tuple[Path, Path]:
    """A run root with the synthetic data and the tiny model; returns (root, config)."""
    dest.mkdir(parents=True)
    (dest / "data").symlink_to(synth_data)
    (dest / "tiny").symlink_to(prepared_root / "tiny")
    return dest, write_config(dest / "cfg.yaml", dest, rm={**SYNTH_RM, "init_from": str(dest / "tiny"), **rm})


@pytest.fixture(scope="module")
def synth_run(prepared_root, synth_data, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank fp32 run on the synthetic preference."""
    root, cfg = synth_root(prepared_root, synth_data, tmp_path_factory.mktemp("synthrun") / "r")
    r = run_cli("rm", cfg)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


def rows_of(root: Path) -> list[dict]:
    from stackllama_ds.run.metrics import read_metrics

    return read_metrics(root / "rm" / "metrics.jsonl")


@pytest.mark.slow
def test_learns_synthetic_preference(synth_run):
    acc = json.loads((synth_run / "rm" / "accuracy.json").read_text())
    print(f"synthetic held-out accuracy {acc['accuracy']:.3f}, margin {acc['margin']:.3f}")
    assert acc["n_pairs"] == 23 and acc["step"] == 100
    assert acc["accuracy"] >= 0.9
    rows = rows_of(synth_run)
    assert [r["step"] for r in rows] == list(range(1, 101))
    assert rows[0]["train_pairs"] == 64 and rows[0]["train_whole"] == 64  # every pair fits: nothing cut
    assert rows[-1]["pairs"] == 800 and rows[-1]["loss"] < rows[0]["loss"]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [50, 100]
    for k in ("step", "loss", "accuracy", "lr", "grad_norm", "pairs", "pairs_per_s", "elapsed_s"):
        assert k in rows[5], k
    assert (synth_run / "rm" / "DONE").exists()


def _score_texts(model, tok, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**tok(t, return_tensors="pt")).logits.squeeze(-1) for t in texts]).float()


@pytest.mark.slow
def test_export_scores_like_training(synth_run):
    """The exported folder loads, holds the trained head, and reproduces the held-out figures unpadded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stackllama_ds.data.prepare import load_prepared
    from stackllama_ds.data.template import format_qa
    from stackllama_ds.engines.consolidate import consolidated_state_dict
    from stackllama_ds.run.checkpoint import latest_checkpoint

    out = synth_run / "rm" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert tok.padding_side == "right"
    sd = consolidated_state_dict(latest_checkpoint(synth_run / "rm" / "checkpoints") / "model")
    assert torch.equal(model.score.weight.float(), sd["score.weight"])

    ev = load_prepared(synth_run / "data")["rm_eval"]
    rj = _score_texts(model, tok, [format_qa(q, a) for q, a in zip(ev["question"], ev["response_j"])])
    rk = _score_texts(model, tok, [format_qa(q, a) for q, a in zip(ev["question"], ev["response_k"])])
    assert torch.isfinite(rj).all()
    acc = json.loads((synth_run / "rm" / "accuracy.json").read_text())
    assert (rj > rk).float().mean().item() == pytest.approx(acc["accuracy"])
    assert (rj - rk).mean().item() == pytest.approx(acc["margin"], rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_resume_after_sigusr1_matches_uninterrupted(synth_run, prepared_root, synth_data, tmp_path):
    from stackllama_ds.run.checkpoint import latest_checkpoint
    from stackllama_ds.run.signals import EXIT_RESUME

    root, cfg = synth_root(prepared_root, synth_data, tmp_path / "r")
    ckpts = root / "rm" / "checkpoints"
    p = subprocess.Popen([sys.executable, "-m", "stackllama_ds.cli", "rm", str(cfg)], cwd=REPO, env=cli_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if latest_checkpoint(ckpts) is not None and len(rows_of(root)) >= 10:
                p.send_signal(signal.SIGUSR1)  # the launcher forwards it to its ranks
                break
            time.sleep(0.02)
        _, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == EXIT_RESUME, err[-3000:]
    stopped = int(latest_checkpoint(ckpts).name.split("-")[1])
    assert 10 <= stopped < 100 and not (root / "rm" / "DONE").exists()
    before = rows_of(root)

    r = run_cli("rm", cfg)
    assert r.returncode == 0, r.stderr[-4000:]
    got, ref = rows_of(root), rows_of(synth_run)
    assert_resumed_at(before, got, stopped)
    assert [x["step"] for x in got] == list(range(1, 101))  # every step exactly once
    after = [x["loss"] for x in got[stopped:]]
    assert after == pytest.approx([x["loss"] for x in ref[stopped:]], rel=1e-4)
    assert [x["pairs"] for x in got] == [x["pairs"] for x in ref]
    a, b = (json.loads((x / "rm" / "accuracy.json").read_text()) for x in (root, synth_run))
    assert a["margin"] == pytest.approx(b["margin"], rel=1e-4)


@pytest.mark.slow
def test_lora_zero3_export_keeps_trained_head(prepared_root, synth_data, tmp_path):
    """LoRA (SEQ_CLS) under partitioned ZeRO-3, unequal eval shards, truncation counted; merged export."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stackllama_ds.config import LoraConfig, ModelConfig
    from stackllama_ds.engines.consolidate import consolidated_state_dict
    from stackllama_ds.models.load import load_reward_model
    from stackllama_ds.run.checkpoint import latest_checkpoint

    lora = {"enabled": True, "r": 4, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    root, cfg = synth_root(
        prepared_root, synth_data, tmp_path / "r", max_steps=6, eval_every=3, save_every=3, max_length=40,
        overlength="truncate", lora=lora,
        engine={"zero_stage": 3, "dtype": "fp32", "micro_batch_size": 4, "stage3_param_persistence_threshold": 0},
    )
    r = run_cli("rm", cfg)
    assert r.returncode == 0, r.stderr[-4000:]
    acc = json.loads((root / "rm" / "accuracy.json").read_text())
    t = acc["truncation"]  # 40 tokens: every pair is over; answers sharing their start end up identical
    assert (t["train"]["total"], t["eval"]["total"], t["train"]["whole"], t["eval"]["whole"]) == (64, 23, 0, 0)
    assert acc["n_pairs"] == 23 - t["eval"]["dropped"] >= 2 and acc["train_pairs"] == 64 - t["train"]["dropped"]
    assert rows_of(root)[0]["train_answer_cut"] == t["train"]["answer_cut"] >= 1

    sd = consolidated_state_dict(latest_checkpoint(root / "rm" / "checkpoints") / "model")
    trained = next(v for k, v in sd.items() if k.endswith("score.modules_to_save.default.weight"))
    assert not any("original_module" in k for k in sd)  # frozen: left out of the checkpoint
    out = root / "rm" / "model"
    assert (out / "adapter").is_dir()
    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert torch.equal(merged.score.weight.float(), trained)

    # The merged folder scores as the base plus adapters did.
    tok = AutoTokenizer.from_pretrained(str(out))
    peft_model = load_reward_model(root / "tiny", ModelConfig(), pad_token_id=tok.pad_token_id,
                                   lora=LoraConfig(**lora))
    peft_model.load_state_dict({k: v for k, v in sd.items() if "lora_" in k or "modules_to_save" in k},
                               strict=False)
    texts = ["Question: Which hops?\n\nAnswer: ```\nprint(hops)\n```", "Question: Ale?\n\nAnswer: Dark malt."]
    want = _score_texts(peft_model.eval(), tok, texts)
    got = _score_texts(merged, tok, texts)
    assert torch.isfinite(got).all()
    assert got.tolist() == pytest.approx(want.tolist(), abs=1e-4)


# ---------------------------------------------------------------------------------- beer sample
@pytest.mark.slow
def test_beer_sample(rm_root):
    acc = json.loads((rm_root / "rm" / "accuracy.json").read_text())
    report = json.loads((rm_root / "data" / "report.json").read_text())
    print(f"beer sample held-out accuracy {acc['accuracy']} on {acc['n_pairs']} pairs (margin {acc['margin']}); "
          f"train pairs {acc['train_pairs']}, cut {acc['truncation']['train']} to max_length {acc['max_length']}")
    assert acc["overlength"] == "truncate"  # FAST_RM: beer answers are long, every pair is kept
    rows = rows_of(rm_root)
    assert [r["step"] for r in rows] == list(range(1, 13))
    # accuracy.json holds the last step's held-out evaluation, logged with that step too; the
    # accuracy is a share of pairs, a tie counting half
    assert acc["step"] == 12
    figures = ("accuracy", "margin", "loss")
    assert [acc[k] for k in figures] == [rows[-1][f"eval_{k}"] for k in figures]
    halves = 2 * acc["accuracy"] * acc["n_pairs"]
    assert halves == pytest.approx(round(halves), abs=1e-9)
    t = acc["truncation"]
    assert acc["train_pairs"] == report["splits"]["rm_train"]["pairs"] - t["train"]["dropped"]
    assert acc["eval_pairs"] == report["splits"]["rm_eval"]["pairs"] - t["eval"]["dropped"] == acc["n_pairs"]
    assert 0 < t["train"]["question_cut"] + t["train"]["answer_cut"] <= acc["train_pairs"]
    assert rows[0]["train_question_cut"] == t["train"]["question_cut"]
    # the final evaluation pair by pair (rm/eval_pairs.jsonl) gives the figures of accuracy.json
    pairs = [json.loads(x) for x in (rm_root / "rm" / "eval_pairs.jsonl").read_text().splitlines()]
    assert [p["index"] for p in pairs] == list(range(acc["n_pairs"]))
    won = [float(p["chosen"] > p["rejected"]) + 0.5 * (p["chosen"] == p["rejected"]) for p in pairs]
    assert acc["held_out"]["accuracy"]["mean"] == pytest.approx(sum(won) / len(won))
    assert acc["accuracy"] == pytest.approx(sum(won) / len(won), abs=1e-6)  # one head: the sum is the quality head
    assert acc["held_out"]["resample"] == "question" and acc["held_out"]["dtype"] in ("bf16", "fp32")  # dtype auto
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [6, 12]
    assert (rm_root / "rm" / "model" / "config.json").exists() and (rm_root / "rm" / "DONE").exists()

