"""Reward-model throughput: our loop vs TRL's RewardTrainer, same model, pairs, length and precision.

    python bench/rm_bench.py                         # bf16 and fp32, 2 rounds, ~6 min on 2 cores
    python bench/rm_bench.py --dtypes bf16 --rounds 3 --steps 30

Both sides train a fresh scalar head on the benchmark Llama from the same (chosen, rejected)
pairs of rm_train (both texts within ``--max-length`` tokens), micro batch ``--micro-batch`` pairs,
1 rank, ours with ``rm.packed`` (its default: one row per micro batch, each question once, no padding),
alternating ours / TRL / TRL with our launcher's ``MALLOC_*`` heap settings (TRL+heap;
``--no-peer-heap`` drops it) in fresh processes; ours ZeRO-0 by default (1 rank: ZeRO-1/2 partition nothing). pairs/s = micro batch over the mean wall time
of the steps after ``--warmup`` (the orders differ: each side shuffles with its own seed, so
use enough steps that padding averages out).
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


def pairs_file(max_length: int) -> Path:
    from stackllama_ds.data.prepare import load_prepared
    from stackllama_ds.data.template import format_qa
    from stackllama_ds.models.load import load_tokenizer

    path = common.OUT / f"rm_pairs_{max_length}.jsonl"
    if not path.exists():
        tok = load_tokenizer(common.ROOT / "tiny")
        split = load_prepared(common.ROOT / "data")["rm_train"]
        lines = []
        for q, j, k in zip(split["question"], split["response_j"], split["response_k"]):
            cj, ck = format_qa(q, j), format_qa(q, k)
            if max(len(x) for x in tok([cj, ck])["input_ids"]) <= max_length:
                lines.append(json.dumps({"chosen": cj, "rejected": ck}) + "\n")
        path.write_text("".join(lines))
    return path


def pair_ids(max_length: int) -> list[tuple[list[int], list[int]]]:
    from stackllama_ds.models.load import load_tokenizer

    texts = [json.loads(x) for x in open(pairs_file(max_length))]
    ids = load_tokenizer(common.ROOT / "tiny")([x for t in texts for x in (t["chosen"], t["rejected"])])["input_ids"]
    return list(zip(ids[::2], ids[1::2]))


def run_ours(a, dtype: str, tag: str) -> dict:
    run = common.OUT / f"rm-{tag}"
    shutil.rmtree(run, ignore_errors=True)
    st = {"init_from": str(common.ROOT / "tiny"), "max_length": a.max_length, "max_steps": a.steps,
          "eval_every": 10_000, "save_every": 10_000,
          "engine": {"zero_stage": a.zero, "micro_batch_size": a.micro_batch, "dtype": dtype,
                     "gradient_accumulation_steps": 1},
          "lora": {"enabled": False}}
    cfg = common.write_config(run, rm=st, launch={"nproc_per_node": 1})
    r, rss = common.run_measured([sys.executable, "-m", "stackllama_ds.cli", "rm", str(cfg)])
    common.check(r, f"our rm ({tag})")
    rows = [x for x in common.read_jsonl(run / "rm" / "metrics.jsonl") if "elapsed_s" in x]
    dts = common.step_times([x["elapsed_s"] for x in rows[:-1]], a.warmup)  # last step also evaluates
    shutil.rmtree(run, ignore_errors=True)
    return {"pps": a.micro_batch / (sum(dts) / len(dts)), "rss": rss}


def run_peer(a, py: Path, dtype: str, tag: str, heap: bool = False) -> dict:
    out = common.OUT / f"peer-rm-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"model": str(common.ROOT / "tiny"), "data": str(pairs_file(a.max_length)), "out": str(out),
            "seq_length": a.max_length, "micro_batch": a.micro_batch, "steps": a.steps, "dtype": dtype,
            "lr": 5e-4, "weight_decay": 0.001, "betas": [0.9, 0.95], "scheduler": "linear", "warmup_steps": 0,
            "threads": os.cpu_count()}
    (out / "spec.json").write_text(json.dumps(spec))
    r, rss = common.run_measured([str(py), str(common.REPO / "bench" / "peer_trl.py"), "rm", str(out / "spec.json")],
                                 extra_env=common.heap_env() if heap else None)
    common.check(r, f"TRL RewardTrainer ({tag})")
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("@@RESULT "))[9:])
    dts = common.step_times(res["stamps"][:-1], a.warmup)
    shutil.rmtree(out, ignore_errors=True)
    return {"pps": res["per_step"] / (sum(dts) / len(dts)), "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--zero", type=int, default=0, help="our ZeRO stage on 1 rank")
    common.add_peer_heap_arg(ap)
    a = ap.parse_args()
    common.ensure_root()
    py, why = peers.ensure("trl116", log=common.log)
    if py is None:
        common.log(f"peer skipped: {why}")
    n_pairs = sum(1 for _ in open(pairs_file(a.max_length)))
    print(f"# RM: {common.machine()}; model {common.n_params() / 1e6:.1f}M params + scalar head; {n_pairs} pairs "
          f"within {a.max_length} tokens; micro batch {a.micro_batch} pairs, 1 rank, {a.steps} steps "
          f"({a.warmup} warm-up), our ZeRO-{a.zero}; peer: {'TRL 1.16.0 RewardTrainer' if py else 'skipped'}"
          f"{common.HEAP_NOTE if py and a.peer_heap else ''}")
    for dtype in a.dtypes.split(","):
        sides = common.peer_sides(
            lambda i, d=dtype: run_ours(a, d, f"{d}-{i}"),
            (lambda i, heap, d=dtype: run_peer(a, py, d, f"{d}-{i}{'-heap' * heap}", heap=heap)) if py else None,
            a.peer_heap)
        res = common.alternate(a.rounds, sides, lambda r: f"{r['pps']:.2f} pairs/s, {r['rss']:.0f} MB")
        print(common.compare_table(res, "pps", "pairs/s", f"RM {dtype}"))
    print(common.rm_tokens_line(common.rm_tokens(pair_ids(a.max_length), a.micro_batch))
          + " (over the pairs file in its order: each side shuffles with its own seed)")


if __name__ == "__main__":
    main()
