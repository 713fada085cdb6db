"""SFT scaling: our tokens/s on 1 and 2 ranks, and the data-parallel efficiency.

    python bench/scaling_bench.py                    # bf16, ZeRO-2, 2 rounds, ~6 min on 2 cores
    python bench/scaling_bench.py --zero 0 --steps 20

Four sides alternate in fresh processes: 1 rank with 1 core (OMP_NUM_THREADS=1), 1 rank with
every core, 2 ranks with cores / 2 each (as the launcher sets it), and two independent 1-rank runs
at once (no communication). Efficiency compares equal cores per rank: tokens/s(2 ranks) /
(2 x tokens/s(1 rank, same cores per rank)); it holds the data-parallel overhead (gradient
reduction over gloo, ZeRO bookkeeping) and the contention of two busy cores for caches and memory.
Against the two lone runs at once it holds only the former. The fixed-machine
speed-up, tokens/s(2 ranks) / tokens/s(1 rank, every core), is printed beside it: on a 2-core box
both runs use the same 2 cores, so ~1.0 there is the best possible.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import sft_bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    a = ap.parse_args()
    common.ensure_root()
    cores = os.cpu_count() or 1
    print(f"# SFT scaling: {common.machine()}; model {common.n_params() / 1e6:.1f}M params; seq {a.seq}, micro batch "
          f"{a.micro_batch} per rank, ZeRO-{a.zero}, {a.dtype}, {a.steps} steps ({a.warmup} warm-up); 1 rank has "
          f"{cores} cores, each of 2 ranks has {max(1, cores // 2)} (OMP_NUM_THREADS)")
    per = max(1, cores // 2)
    res = common.alternate(a.rounds, {
        f"1 rank x {per} core": lambda i: sft_bench.run_ours(a, a.dtype, f"scale1s-{i}", nproc=1, threads=per),
        f"1 rank x {cores} cores": lambda i: sft_bench.run_ours(a, a.dtype, f"scale1-{i}", nproc=1),
        f"2 ranks x {per} core": lambda i: sft_bench.run_ours(a, a.dtype, f"scale2-{i}", nproc=2),
        "2 lone ranks at once": lambda i: two_alone(a, per, i),
    }, lambda r: f"{r['tps']:.0f} tok/s")
    small, one, two, alone = res.values()
    rows = [[f"round {i + 1}", small[i]["tps"], one[i]["tps"], two[i]["tps"], alone[i]["tps"],
             two[i]["tps"] / (2 * small[i]["tps"]), two[i]["tps"] / alone[i]["tps"], two[i]["tps"] / one[i]["tps"],
             two[i]["rss"]] for i in range(a.rounds)]
    s_, o, t, al = (common.median([x["tps"] for x in v]) for v in (small, one, two, alone))
    rows.append(["median", s_, o, t, al, t / (2 * s_), t / al, t / o, max(x["rss"] for x in two)])
    print(common.table(["", *(f"{k} tok/s" for k in res), "efficiency (equal cores/rank)",
                        "efficiency vs lone ranks at once", "speed-up on the same machine",
                        "2-rank peak RSS MB per rank"], rows, f"SFT scaling ({a.dtype}, ZeRO-{a.zero})"))


def two_alone(a, per: int, i: int) -> dict:
    """Two independent 1-rank runs of ``per`` cores at the same time: what 2 ranks could reach on this
    box without any communication (they share caches and memory bandwidth as the 2 ranks do)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        runs = list(ex.map(lambda k: sft_bench.run_ours(a, a.dtype, f"scale-alone{k}-{i}", nproc=1, threads=per),
                           range(2)))
    return {"tps": sum(r["tps"] for r in runs), "rss": max(r["rss"] for r in runs)}


if __name__ == "__main__":
    main()
