"""SFT throughput: our loop vs TRL's SFTTrainer (packing), same model, data, shape and precision.

    python bench/sft_bench.py                        # fp32 and bf16, 2 rounds, ~8 min on 2 cores
    python bench/sft_bench.py --dtypes bf16 --rounds 3 --steps 20

Each round runs ours, then the peer, in fresh processes (1 rank, all cores), so a ratio holds on a
noisy machine. tokens/s is micro_batch x seq_length over the mean wall time of the steps after
``--warmup``. Peak RSS is the largest process's (getrusage of the children). The bf16 table also
gives our tokens/s as a share of the machine's bf16 ceiling: 6 x params FLOP per token over a
2048^3 bf16 matmul rate measured here on the same threads.
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


def texts_file() -> Path:
    from stackllama_ds.data.prepare import load_prepared, sft_texts

    path = common.OUT / "sft_texts.jsonl"
    if not path.exists():
        texts = sft_texts(load_prepared(common.ROOT / "data")["sft"])
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def stage_settings(a) -> dict:
    return {"seq_length": a.seq, "max_steps": a.steps, "eval_every": 10_000, "eval_batches": 1,
            "save_every": 10_000, "engine": {"zero_stage": a.zero, "micro_batch_size": a.micro_batch,
                                             "dtype": None, "gradient_accumulation_steps": 1},
            "optim": {"lr": 3e-4, "warmup_steps": 2}}


def run_ours(a, dtype: str, tag: str, nproc: int = 1) -> dict:
    run = common.OUT / f"sft-{tag}"
    shutil.rmtree(run, ignore_errors=True)
    st = stage_settings(a)
    st["engine"]["dtype"] = dtype
    cfg = common.write_config(run, sft=st, launch={"nproc_per_node": nproc})
    r, rss = common.run_measured([sys.executable, "-m", "stackllama_ds.cli", "sft", str(cfg)])
    common.check(r, f"our sft ({tag})")
    rows = [x for x in common.read_jsonl(run / "sft" / "metrics.jsonl") if "elapsed_s" in x]
    # The last step also runs the final evaluation: leave it out with the warm-up steps.
    dts = common.step_times([x["elapsed_s"] for x in rows[:-1]], a.warmup)
    tok_step = a.micro_batch * a.seq * nproc
    shutil.rmtree(run, ignore_errors=True)
    return {"tps": tok_step / (sum(dts) / len(dts)), "rss": rss, "steps": len(dts)}


def run_peer(a, py: Path, dtype: str, tag: str) -> dict:
    out = common.OUT / f"peer-sft-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"model": str(common.ROOT / "tiny"), "data": str(texts_file()), "out": str(out), "seq_length": a.seq,
            "micro_batch": a.micro_batch, "steps": a.steps, "dtype": dtype, "lr": 3e-4, "weight_decay": 0.05,
            "betas": [0.9, 0.95], "scheduler": "cosine", "warmup_steps": 2, "threads": os.cpu_count()}
    (out / "spec.json").write_text(json.dumps(spec))
    r, rss = common.run_measured([str(py), str(common.REPO / "bench" / "peer_trl.py"), "sft", str(out / "spec.json")])
    common.check(r, f"TRL SFTTrainer ({tag})")
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("@@RESULT "))[9:])
    stamps = res["stamps"][:-1]  # same steps as ours
    dts = common.step_times(stamps, a.warmup)
    shutil.rmtree(out, ignore_errors=True)
    return {"tps": res["per_step"] / (sum(dts) / len(dts)), "rss": rss, "steps": len(dts), "optim": res["optim"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2, help="our ZeRO stage (the recipe's default; 1 rank)")
    a = ap.parse_args()
    common.ensure_root()
    n = common.n_params()
    py, why = peers.ensure("trl116", log=common.log)
    if py is None:
        common.log(f"peer skipped: {why}")
    print(f"# SFT: {common.machine()}; model {n / 1e6:.1f}M params (Llama, hidden 512, 8 layers, vocab 8192); "
          f"seq {a.seq}, micro batch {a.micro_batch}, 1 rank, {a.steps} steps ({a.warmup} warm-up), "
          f"our ZeRO-{a.zero}; peer: TRL {('1.16.0 SFTTrainer, packing wrapped') if py else 'skipped'}")
    ceiling = None
    for dtype in a.dtypes.split(","):
        ours, theirs = [], []
        for i in range(a.rounds):
            ours.append(run_ours(a, dtype, f"{dtype}-{i}"))
            common.log(f"  ours {dtype} round {i}: {ours[-1]['tps']:.0f} tok/s, {ours[-1]['rss']:.0f} MB")
            if py is not None:
                theirs.append(run_peer(a, py, dtype, f"{dtype}-{i}"))
                common.log(f"  peer {dtype} round {i}: {theirs[-1]['tps']:.0f} tok/s, {theirs[-1]['rss']:.0f} MB")
        rows = []
        for i in range(a.rounds):
            t = theirs[i] if theirs else None
            rows.append([f"round {i + 1}", ours[i]["tps"], t["tps"] if t else float("nan"),
                         ours[i]["tps"] / t["tps"] if t else float("nan"),
                         ours[i]["rss"], t["rss"] if t else float("nan")])
        o = common.median([x["tps"] for x in ours])
        p = common.median([x["tps"] for x in theirs]) if theirs else float("nan")
        rows.append(["median", o, p, o / p, max(x["rss"] for x in ours),
                     max((x["rss"] for x in theirs), default=float("nan"))])
        print(common.table(["", "ours tok/s", "TRL tok/s", "ours/TRL", "ours peak RSS MB", "TRL peak RSS MB"],
                           rows, f"SFT {dtype}"))
        if dtype == "bf16":
            import torch

            rate = common.matmul_rate("bf16", threads=os.cpu_count())
            torch.set_num_threads(os.cpu_count())
            ceiling = rate / (6 * n)
            print(f"\nbf16 matmul 2048^3 on {os.cpu_count()} threads: {rate / 1e9:.0f} GFLOP/s -> ceiling "
                  f"{ceiling:,.0f} tok/s (6 x {n / 1e6:.1f}M FLOP/token); ours {o:,.0f} tok/s = "
                  f"{100 * o / ceiling:.0f}% of the ceiling (TRL {100 * p / ceiling:.0f}%)")
    if theirs:
        print(f"\npeer optimizer: {theirs[0]['optim']}; ours: DeepSpeed AdamW (torch)")


if __name__ == "__main__":
    main()
