"""SFT scaling: our tokens/s on 1 and 2 ranks of this machine, and the efficiency.

    python bench/scaling_bench.py                    # bf16, 2 rounds, ~5 min on 2 cores
    python bench/scaling_bench.py --dtype fp32 --steps 12

Alternates 1 rank (all cores) and 2 ranks (cores split between them: OMP_NUM_THREADS = cores / 2,
as the launcher sets it) in fresh processes. Efficiency = tokens/s(2) / (2 x tokens/s(1)).
On a 2-core box each of the 2 ranks has ONE core while the single rank has two, so this measures
data-parallel overhead (gradient all-reduce over gloo, ZeRO bookkeeping) at a fixed core count.
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
    res = common.alternate(a.rounds, {
        "1 rank": lambda i: sft_bench.run_ours(a, a.dtype, f"scale1-{i}", nproc=1),
        "2 ranks": lambda i: sft_bench.run_ours(a, a.dtype, f"scale2-{i}", nproc=2),
    }, lambda r: f"{r['tps']:.0f} tok/s")
    one, two = res["1 rank"], res["2 ranks"]
    rows = [[f"round {i + 1}", one[i]["tps"], two[i]["tps"], two[i]["tps"] / (2 * one[i]["tps"]),
             two[i]["tps"] / one[i]["tps"], one[i]["rss"], two[i]["rss"]] for i in range(a.rounds)]
    o, t = common.median([x["tps"] for x in one]), common.median([x["tps"] for x in two])
    rows.append(["median", o, t, t / (2 * o), t / o, max(x["rss"] for x in one), max(x["rss"] for x in two)])
    print(common.table(["", "1 rank tok/s", "2 ranks tok/s", "efficiency", "speed-up", "1-rank peak RSS MB",
                        "2-rank peak RSS MB per rank"], rows, f"SFT scaling ({a.dtype})"))


if __name__ == "__main__":
    main()
