"""SFT throughput: our loop vs TRL's SFTTrainer (packing), same model, data, shape and precision.

    python bench/sft_bench.py                        # fp32 and bf16, 2 rounds, ~8 min on 2 cores
    python bench/sft_bench.py --dtypes bf16 --rounds 3 --steps 20

Each round runs ours, then the peer, then the peer with our launcher's glibc heap settings
(``MALLOC_*``, stackllama_ds/launcher/spawn.py; ``--no-peer-heap`` drops that side), in fresh
processes (1 rank, all cores), so a ratio holds on a noisy machine. Ours runs ZeRO-0 by default:
on 1 rank ZeRO-1/2 partition nothing and only add bucket copies (``--zero 2`` measures that). tokens/s is micro_batch x seq_length over the mean wall time of the steps after
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


def run_ours(a, dtype: str, tag: str, nproc: int = 1, threads: int | None = None) -> dict:
    """Our SFT on ``nproc`` ranks; ``threads`` per rank (default: the launcher's cores / nproc)."""
    run = common.OUT / f"sft-{tag}"
    shutil.rmtree(run, ignore_errors=True)
    st = stage_settings(a)
    st["engine"]["dtype"] = dtype
    cfg = common.write_config(run, sft=st, launch={"nproc_per_node": nproc})
    r, rss = common.run_measured([sys.executable, "-m", "stackllama_ds.cli", "sft", str(cfg)],
                                 extra_env={"OMP_NUM_THREADS": str(threads)} if threads else None)
    common.check(r, f"our sft ({tag})")
    rows = [x for x in common.read_jsonl(run / "sft" / "metrics.jsonl") if "elapsed_s" in x]
    # The last step also runs the final evaluation: leave it out with the warm-up steps.
    dts = common.step_times([x["elapsed_s"] for x in rows[:-1]], a.warmup)
    tok_step = a.micro_batch * a.seq * nproc
    shutil.rmtree(run, ignore_errors=True)
    return {"tps": tok_step / (sum(dts) / len(dts)), "rss": rss, "steps": len(dts)}


def run_peer(a, py: Path, dtype: str, tag: str, heap: bool = False) -> dict:
    out = common.OUT / f"peer-sft-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"model": str(common.ROOT / "tiny"), "data": str(texts_file()), "out": str(out), "seq_length": a.seq,
            "micro_batch": a.micro_batch, "steps": a.steps, "dtype": dtype, "lr": 3e-4, "weight_decay": 0.05,
            "betas": [0.9, 0.95], "scheduler": "cosine", "warmup_steps": 2, "threads": os.cpu_count()}
    (out / "spec.json").write_text(json.dumps(spec))
    r, rss = common.run_measured([str(py), str(common.REPO / "bench" / "peer_trl.py"), "sft", str(out / "spec.json")],
                                 extra_env=common.heap_env() if heap else None)
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
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--zero", type=int, default=0, help="our ZeRO stage on 1 rank")
    common.add_peer_heap_arg(ap)
    a = ap.parse_args()
    common.ensure_root()
    n = common.n_params()
    py, why = peers.ensure("trl116", log=common.log)
    if py is None:
        common.log(f"peer skipped: {why}")
    print(f"# SFT: {common.machine()}; model {n / 1e6:.1f}M params (Llama, hidden 512, 8 layers, vocab 8192); "
          f"seq {a.seq}, micro batch {a.micro_batch}, 1 rank, {a.steps} steps ({a.warmup} warm-up), "
          f"our ZeRO-{a.zero}; peer: {('TRL 1.16.0 SFTTrainer, packing wrapped') if py else 'skipped'}"
          f"{common.HEAP_NOTE if py and a.peer_heap else ''}")
    for dtype in a.dtypes.split(","):
        sides = common.peer_sides(
            lambda i, d=dtype: run_ours(a, d, f"{d}-{i}"),
            (lambda i, heap, d=dtype: run_peer(a, py, d, f"{d}-{i}{'-heap' * heap}", heap=heap)) if py else None,
            a.peer_heap)
        res = common.alternate(a.rounds, sides, lambda r: f"{r['tps']:.0f} tok/s, {r['rss']:.0f} MB")
        print(common.compare_table(res, "tps", "tok/s", f"SFT {dtype}"))
        if dtype == "bf16":
            import torch

            rate = common.matmul_rate("bf16", threads=os.cpu_count())
            torch.set_num_threads(os.cpu_count())
            ceiling = rate / (6 * n)
            o = common.median([x["tps"] for x in res["ours"]])
            peer = "".join(f", {k} {100 * common.median([x['tps'] for x in v]) / ceiling:.0f}%"
                           for k, v in res.items() if k != "ours")
            print(f"\nbf16 matmul 2048^3 on {os.cpu_count()} threads: {rate / 1e9:.0f} GFLOP/s -> ceiling "
                  f"{ceiling:,.0f} tok/s (6 x {n / 1e6:.1f}M FLOP/token); ours {o:,.0f} tok/s = "
                  f"{100 * o / ceiling:.0f}% of the ceiling{peer}")
        if py is not None:
            print(f"\npeer optimizer: {res['TRL'][0]['optim']}; ours: DeepSpeed AdamW (torch fused)")


if __name__ == "__main__":
    main()
