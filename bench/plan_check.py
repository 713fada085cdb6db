"""Validate the memory planner against measured peak RSS per rank on this CPU box.

    python bench/plan_check.py                       # 9 configurations, a few steps each, ~6 min
    python bench/plan_check.py --only sft-z2-1rank,ppo-z2-1rank

Each configuration runs its stage for a few steps on the benchmark model; its largest rank's peak RSS less
the runtime baseline (a rank that imports the stack, joins a process group and loads tokenizer and data)
is compared with the planner's estimate less its fixed runtime overhead. Target: within 25%.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

_BASELINE = r"""
import os, resource
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
import torch, deepspeed, transformers  # noqa
import stackllama_ds.stages.sft, stackllama_ds.stages.rm, stackllama_ds.stages.ppo  # noqa
from stackllama_ds.engines import dist
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.models.load import load_tokenizer
dist.init("gloo", 60)
tok = load_tokenizer(os.environ["BENCH_MODEL"])
d = load_prepared(os.environ["BENCH_DATA"])
print("@@BASE", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

SFT = {"max_steps": 3, "eval_every": 10_000, "eval_batches": 1, "save_every": 10_000, "seq_length": 512,
       "optim": {"warmup_steps": 0}}
RM = {"init_from": None, "max_length": 512, "max_steps": 3, "eval_every": 10_000, "save_every": 10_000,
      "lora": {"enabled": False}}
_BF16 = {"dtype": "bf16"}
PPO = {"steps": 2, "batch_size": 8, "mini_batch_size": 2, "gradient_accumulation_steps": 1, "ppo_epochs": 1,
       "response_min_length": 32, "response_max_length": 32, "max_prompt_length": 256,
       "early_stopping": False, "save_every": 10_000, "log_samples": 0, "optim": {"lr": 1.41e-5},
       "lora": {"enabled": False}, "actor": {"zero_stage": 2, **_BF16}, "critic": {"zero_stage": 2, **_BF16},
       "reference": _BF16, "reward": _BF16}


def cases() -> dict[str, tuple[str, int, dict]]:
    """name -> (stage, ranks, config sections)."""
    e = {"dtype": "bf16", "micro_batch_size": 4, "gradient_accumulation_steps": 1}

    def sft(ranks: int, zero: int, lora: dict | None = None, **engine) -> tuple[str, int, dict]:
        st = {**SFT, "engine": {**e, "zero_stage": zero, **engine}, **({"lora": lora} if lora else {})}
        return "sft", ranks, {"sft": st}

    return {"sft-z0-1rank": sft(1, 0), "sft-z2-1rank": sft(1, 2),
            "sft-z2-1rank-fp32": sft(1, 2, dtype="fp32"),
            "sft-z2-1rank-ckpt": sft(1, 2, gradient_checkpointing=True),
            "sft-z2-1rank-lora": sft(1, 2, {"enabled": True, "r": 16}), "sft-z2-2ranks": sft(2, 2),
            "sft-z3-2ranks": sft(2, 3, stage3_param_persistence_threshold=0),
            "rm-z2-1rank": ("rm", 1, {"rm": {**RM, "init_from": str(h.ROOT / "tiny"),
                                             "engine": {**e, "zero_stage": 2}}}),
            "ppo-z2-1rank": ("ppo", 1, {"ppo": PPO})}


def baseline_mb() -> float:
    r, _ = h.run_measured([sys.executable, "-c", _BASELINE], extra_env={"BENCH_MODEL": str(h.ROOT / "tiny"),
                                                                      "BENCH_DATA": str(h.ROOT / "data")})
    h.check(r, "baseline")
    return float(next(x for x in r.stdout.splitlines() if x.startswith("@@BASE")).split()[1])


def estimate(cfg_path: Path, stage: str, ranks: int) -> tuple[float, float]:
    """(planner's stage peak in MB, the same without the fixed runtime overhead)."""
    from stackllama_ds import plan
    from stackllama_ds.config_loader import load_config

    cfg = load_config(cfg_path, world_size=ranks)
    sp = plan.PLANNERS[stage](cfg, plan.model_shape(cfg), ranks, 1e12, "cpu")
    return sp.total / 2**20, (sp.total - plan.FIXED_OVERHEAD["cpu"]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--measured", type=Path, help="re-estimate from an earlier run's stderr log (no runs)")
    ap.add_argument("--baseline", type=float, help="with --measured: the baseline MB that run printed")
    a = ap.parse_args()
    h.ensure_root()
    lines = a.measured.read_text().splitlines() if a.measured else []
    peak = re.compile(r"\s+(\S+): peak (\d+) MB")  # the log lines below
    logged = {m.group(1): float(m.group(2)) for m in map(peak.match, lines) if m}
    base = a.baseline if a.measured else baseline_mb()
    print(f"# plan check: {h.machine()}; model {h.n_params() / 1e6:.1f}M params; runtime baseline "
          f"{base:.0f} MB RSS per rank (imports, process group, tokenizer, data); SFT seq 512 x micro 4, "
          f"RM 4 pairs x 512, PPO batch 8 / minibatch 2 / 32 new tokens / prompts <= 256; bf16 unless named")
    rows = []
    for name, (stage, ranks, sections) in cases().items():
        if a.only and name not in a.only.split(",") or a.measured and name not in logged:
            continue
        links = {"data": h.ROOT / "data", "tiny": h.ROOT / "tiny"}
        if stage == "ppo":  # the benchmark model as SFT model and as reward model (a fresh score head)
            links.update({"sft/model": h.ROOT / "tiny", "rm/model": h.ROOT / "tiny"})
        cfg = h.write_config(h.OUT / f"plan-{name}", h.TINY_YAML, links, launch={"nproc_per_node": ranks},
                             model={"tiny": h.BENCH_MODEL}, **sections)
        note = ""
        if a.measured:
            r, rss = None, logged[name]
        else:
            r, rss = h.run_measured([sys.executable, "-m", "stackllama_ds.cli", stage, str(cfg)])
        if r is not None and r.returncode:
            # The training steps may have run (the peak is then valid) and a later phase failed.
            metrics = cfg.parent / stage / "metrics.jsonl"
            if not (metrics.exists() and any('"step"' in x for x in metrics.read_text().splitlines())):
                h.check(r, name)
            last = [x for x in r.stderr.strip().splitlines() if x.strip()][-3:]
            note = " (trained; then failed: " + " / ".join(last)[-160:] + ")"
            h.log(f"  {name}: exit {r.returncode} after training{note}")
        est_total, est_model = estimate(cfg, stage, ranks)
        measured = rss - base
        err = est_model / measured - 1
        rows.append([name, rss, measured, est_model, est_total, f"{100 * err:+.0f}%",
                     ("yes" if abs(err) <= 0.25 else "NO") + ("*" if note else "")])
        h.log(f"  {name}: peak {rss:.0f} MB, above baseline {measured:.0f} MB, estimate {est_model:.0f} MB "
              f"({100 * err:+.0f}%)")
        h.rmtree(cfg.parent)
    print(h.table(["config", "peak RSS MB/rank", "above baseline MB", "planner (no runtime) MB",
                   "planner total MB", "error", "within 25%"], rows, "planner vs measured"))
    if any(str(r[-1]).endswith("*") for r in rows):
        print("* the stage failed after its training steps (see stderr); the peak covers the steps it ran")


if __name__ == "__main__":
    main()
