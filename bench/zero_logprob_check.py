"""Per-token log-probs of fixed answers under the PPO actor, ZeRO-2 vs ZeRO-3, bf16 vs fp32.

    python bench/zero_logprob_check.py [--root runs/smollm2] [--b-std 1e-4]

Needs a run root with ``sft/model`` and ``rm/model`` (``stackllama-ds pipeline configs/smollm2.yaml``).
For each of ZeRO-2/ZeRO-3 x bf16/fp32 it builds PPO's engines on 2 CPU ranks (``configs/smollm2.yaml``,
LoRA, the generation copy at ZeRO-3), sets every LoRA B to the same seeded N(0, b_std) values (a policy
a few updates from the reference), and computes the log-probs of two fixed answers under the actor
and under the reference (adapter disabled). Prints the per-answer sum of ``logp - logp_ref`` (the KL
estimate's per-sequence term) and each setting's largest per-token error against ZeRO-2 fp32.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "zero_logprob"
TEXTS = [
    "Question: How do I brew beer at home?\n\nAnswer: Start with a malt extract kit, sanitise everything, "
    "and keep the fermenter cool.",
    "Question: Why is my beer cloudy?\n\nAnswer: Chill haze comes from proteins and polyphenols; cold crash "
    "it and use finings.",
]
PROMPT_TOKENS = 12  # the first 12 tokens count as the prompt: log-probs of the rest
SETTINGS = {"zero2-bf16": (2, "bf16"), "zero3-bf16": (3, "bf16"), "zero2-fp32": (2, "fp32"), "zero3-fp32": (3, "fp32")}


def worker(root: str, name: str, b_std: float) -> None:
    import deepspeed

    from stackllama_ds.config_loader import load_config
    from stackllama_ds.engines import dist
    from stackllama_ds.models.forward import policy_forward
    from stackllama_ds.models.load import load_tokenizer
    from stackllama_ds.models.padding import pad
    from stackllama_ds.run import entry
    from stackllama_ds.run.layout import RunLayout
    from stackllama_ds.stages import ppo_steps

    stage, dtype = SETTINGS[name]
    sets = [f"output_root={root}", f"ppo.actor.zero_stage={stage}", f"ppo.reward.zero_stage={stage}",
            f"ppo.actor.dtype={dtype}"]
    cfg = load_config(REPO / "configs" / "smollm2.yaml", sets)
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
        torch.save({"lp": lp.float(), "ref": ref.float(), "mask": mask[:, PROMPT_TOKENS:].float()}, OUT / f"{name}.pt")
    dist.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO / "runs" / "smollm2"), help="run root with sft/model and rm/model")
    ap.add_argument("--b-std", type=float, default=1e-4)
    ap.add_argument("--worker", choices=list(SETTINGS))
    a = ap.parse_args()
    if a.worker:
        worker(a.root, a.worker, a.b_std)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in SETTINGS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29579",
               __file__, "--root", a.root, "--b-std", str(a.b_std), "--worker", name]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    res = {name: torch.load(OUT / f"{name}.pt") for name in SETTINGS}
    truth = res["zero2-fp32"]
    print(f"LoRA B ~ N(0, {a.b_std:g}); {len(TEXTS)} answers; logp error = max |logp - logp(zero2-fp32)| per token")
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


if __name__ == "__main__":
    main()
