"""ZeRO-3 rollout generation: gather-once (``ppo.gather_generation: true``) vs the partitioned actor.

    python bench/zero3_gen_bench.py                  # 2 ranks, 2 rounds, ~5 min on 2 cores
    python bench/zero3_gen_bench.py --response-len 64 --steps 4

PPO on 2 ranks with the actor under ZeRO-3 and ``stage3_param_persistence_threshold: 0`` (so the
benchmark model really is partitioned). Generation tokens/s = batch x 2 ranks x response length /
``t_generate`` (from the PPO metrics), mean over the steps after ``--warmup``; the gather-once
time includes the per-rollout gather into the plain copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import ppo_bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--mini-batch", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args()
    common.ensure_root()
    z3 = {"zero_stage": 3, "dtype": a.dtype, "stage3_param_persistence_threshold": 0}
    print(f"# ZeRO-3 generation: {common.machine()}; model {common.n_params() / 1e6:.1f}M params; 2 ranks (1 core "
          f"each), actor ZeRO-3 with stage3_param_persistence_threshold 0, {a.dtype}; batch {a.batch} per rank, "
          f"{a.response_len} new tokens, {a.steps} PPO steps ({a.warmup} warm-up)")
    res: dict[bool, list[dict]] = {True: [], False: []}
    for i in range(a.rounds):
        for gather in (True, False):
            r = ppo_bench.run_ours(a, f"z3gen-{int(gather)}-{i}", nproc=2, actor=z3, critic=z3,
                                   gather_generation=gather)
            r["gen_tps"] = a.batch * 2 * a.response_len / r["t_generate"]
            res[gather].append(r)
            common.log(f"  gather={gather} round {i}: {r['gen_tps']:.0f} tok/s ({r['t_generate']:.2f} s)")
    rows = []
    for i in range(a.rounds):
        g, n = res[True][i], res[False][i]
        rows.append([f"round {i + 1}", g["gen_tps"], n["gen_tps"], g["gen_tps"] / n["gen_tps"], g["t_generate"],
                     n["t_generate"], g["rss"], n["rss"]])
    med = {k: common.median([x["gen_tps"] for x in v]) for k, v in res.items()}
    rows.append(["median", med[True], med[False], med[True] / med[False],
                 common.median([x["t_generate"] for x in res[True]]), common.median([x["t_generate"] for x in res[False]]),
                 max(x["rss"] for x in res[True]), max(x["rss"] for x in res[False])])
    print(common.table(["", "gather-once tok/s", "partitioned tok/s", "speed-up", "gather t_generate s",
                        "partitioned t_generate s", "gather peak RSS MB/rank", "partitioned peak RSS MB/rank"],
                       rows, "ZeRO-3 generation (2 ranks)"))


if __name__ == "__main__":
    main()
