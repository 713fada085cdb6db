"""PPO step time: our loop vs TRL's classic PPOTrainer (trl 0.11.4 in its own venv) on the same work.

    python bench/ppo_bench.py                        # 2 rounds, ~6 min on 2 cores
    python bench/ppo_bench.py --steps 6 --batch 16 --response-len 64 --dtype fp32

Same model (policy, frozen reference copy, a sequence-classifier reward on question + response),
same prompts in the same order, exactly ``--response-len`` sampled tokens, batch, minibatch and
PPO epochs; KL early stopping off on both sides so both do every epoch. 1 rank, alternating
ours / TRL / TRL with our launcher's ``MALLOC_*`` heap settings (TRL+heap; ``--no-peer-heap``
drops it) in fresh processes; our actor ZeRO-0 by default (1 rank: ZeRO-1/2 partition nothing). Step time = rollout + scoring + training, mean over steps after
``--warmup``; ours is split into generate / score / log-probs / train.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import peers  # noqa: E402


def ppo_section(a, **extra) -> dict:
    d = {"steps": a.steps, "batch_size": a.batch, "mini_batch_size": a.mini_batch, "gradient_accumulation_steps": 1,
         "ppo_epochs": a.epochs, "response_min_length": a.response_len, "response_max_length": a.response_len,
         "max_prompt_length": a.max_prompt, "early_stopping": False, "save_every": 10_000, "log_samples": 0,
         "optim": {"lr": 1.41e-5}, "lora": {"enabled": False},
         "actor": {"zero_stage": a.zero, "dtype": a.dtype}, "critic": {"zero_stage": a.zero, "dtype": a.dtype},
         "reference": {"zero_stage": 0, "dtype": a.dtype}, "reward": {"zero_stage": 0, "dtype": a.dtype}}
    for k, v in extra.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def make_run(name: str, a, nproc: int = 1, **extra) -> Path:
    """A run root whose sft/model and rm/model are the benchmark model (a fresh reward head)."""
    run = common.OUT / name
    shutil.rmtree(run, ignore_errors=True)
    cfg = common.write_config(run, ppo=ppo_section(a, **extra), launch={"nproc_per_node": nproc})
    for stage in ("sft", "rm"):
        (run / stage).mkdir(parents=True, exist_ok=True)
        (run / stage / "model").symlink_to(common.ROOT / "tiny")
    return cfg


def run_ours(a, tag: str, nproc: int = 1, **extra) -> dict:
    cfg = make_run(f"ppo-{tag}", a, nproc, **extra)
    r, rss = common.run_measured([sys.executable, "-m", "stackllama_ds.cli", "ppo", str(cfg)])
    common.check(r, f"our ppo ({tag})")
    rows = [x for x in common.read_jsonl(cfg.parent / "ppo" / "metrics.jsonl") if "t_generate" in x]
    rows = rows[a.warmup:]
    keys = ("t_generate", "t_score", "t_logprobs", "t_train")
    out = {k: sum(x[k] for x in rows) / len(rows) for k in keys}
    out["total"] = sum(out[k] for k in keys)
    out["response_len"] = sum(x["response_len"] for x in rows) / len(rows)
    out["rss"] = rss
    shutil.rmtree(cfg.parent, ignore_errors=True)
    return out


def prompt_spec(a) -> list[dict]:
    """The prompts our run draws at each step (rank 0 of 1), for the peer to use in the same order."""
    from stackllama_ds.config import load_config
    from stackllama_ds.data.prompts import load_prompts, prompt_batch
    from stackllama_ds.models.load import load_tokenizer

    cfg = load_config(make_run("ppo-prompts", a), check_files=False)
    tok = load_tokenizer(common.ROOT / "tiny")
    questions, ids, _ = load_prompts(cfg.root() / "data", tok, "rl_train", cfg.ppo.max_prompt_length)
    shutil.rmtree(common.OUT / "ppo-prompts", ignore_errors=True)
    steps = []
    for s in range(a.steps):
        idx = prompt_batch(len(questions), s * a.batch, a.batch, 0, 1, cfg.seed)
        steps.append({"prompt_ids": [ids[i] for i in idx], "questions": [questions[i] for i in idx]})
    return steps


def run_peer(a, py: Path, tag: str, steps: list[dict], heap: bool = False) -> dict:
    out = common.OUT / f"peer-ppo-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"model": str(common.ROOT / "tiny"), "lr": 1.41e-5, "batch_size": a.batch, "mini_batch_size": a.mini_batch,
            "ppo_epochs": a.epochs, "response_len": a.response_len, "dtype": a.dtype, "steps": steps,
            "threads": os.cpu_count()}
    (out / "spec.json").write_text(json.dumps(spec))
    r, rss = common.run_measured([str(py), str(common.REPO / "bench" / "peer_trl_ppo.py"), str(out / "spec.json")],
                                 extra_env=common.heap_env() if heap else None)
    common.check(r, f"TRL PPOTrainer ({tag})")
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("@@RESULT "))[9:])
    rows = res["rows"][a.warmup:]
    o = {k: sum(x[k] for x in rows) / len(rows) for k in ("t_generate", "t_score", "t_step", "total")}
    o["rss"] = rss
    shutil.rmtree(out, ignore_errors=True)
    return o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mini-batch", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--zero", type=int, default=0, help="our actor's ZeRO stage on 1 rank")
    common.add_peer_heap_arg(ap)
    a = ap.parse_args()
    common.ensure_root()
    py, why = peers.ensure("trl011", log=common.log)
    if py is None:
        common.log(f"peer skipped: {why}")
    steps = prompt_spec(a)
    print(f"# PPO: {common.machine()}; model {common.n_params() / 1e6:.1f}M params (actor + value head, frozen "
          f"reference, reward = same Llama with a scalar head); batch {a.batch}, minibatch {a.mini_batch}, "
          f"{a.epochs} PPO epochs, {a.response_len} new tokens, prompts <= {a.max_prompt} tokens, {a.dtype}, 1 rank, "
          f"{a.steps} steps ({a.warmup} warm-up), our actor ZeRO-{a.zero}; peer: "
          f"{'TRL 0.11.4 PPOTrainer (transformers 4.46.3)' if py else 'skipped'}")
    sides = common.peer_sides(lambda i: run_ours(a, str(i)),
                              (lambda i, heap: run_peer(a, py, f"{i}{'-heap' * heap}", steps, heap=heap)) if py else None,
                              a.peer_heap)
    res = common.alternate(a.rounds, sides, lambda r: f"{r['total']:.2f} s/step, {r['rss']:.0f} MB")
    print(common.compare_table(res, "total", "s/step", f"PPO step ({a.dtype})", higher_is_better=False))
    split = [["ours", *(common.median([x[k] for x in res["ours"]]) for k in ("t_generate", "t_score", "t_logprobs",
                                                                                "t_train")),
              common.median([x["t_logprobs"] + x["t_train"] for x in res["ours"]])]]
    for k, v in res.items():
        if k != "ours":
            split.append([k, *(common.median([x[c] for x in v]) for c in ("t_generate", "t_score")),
                          float("nan"), float("nan"), common.median([x["t_step"] for x in v])])
    print(common.table(["", "generate s", "score s", "log-probs s", "train s", "log-probs + train s"], split,
                       "time split (median of rounds; TRL's step() holds its log-probs and training)"))


if __name__ == "__main__":
    main()
