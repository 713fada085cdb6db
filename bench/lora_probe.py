"""The matmul side of bench/lora_bench.py: the machine's rate at a step's shapes, taking turns with the step.

    python bench/lora_probe.py SPEC.json

At each of its turns (bench/turns.py) it runs F.linear of (rows x d_in) by every (d_in -> d_out) of
the model (q, k, v, o, gate, up, down, and the LM head when ``head``), in ``dtype`` on ``threads``
threads, over and over until it has done ``flops`` FLOPs (a step's worth), and times that. So the
rate is taken over as long a window as a step and under the same load as the steps beside it,
which a best-of-a-few-bursts measurement on a busy machine is not. Prints one JSON line: each
turn's seconds and FLOPs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from turns import Turns  # noqa: E402


def main() -> None:
    import torch
    import torch.nn.functional as F

    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    td = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    rows = spec["rows"]
    mats = [(torch.randn(rows, i, dtype=td), torch.randn(o, i, dtype=td), c) for i, o, c in spec["linears"]]
    per_set = sum(2 * rows * w.shape[0] * w.shape[1] * c for _, w, c in mats)
    for x, w, _ in mats:  # warm the kernels up outside the timed turns
        F.linear(x, w)
    turn = Turns(**spec["turns"]) if spec.get("turns") else None
    out = []
    for k in range(spec["steps"]):
        if turn is not None:
            turn.wait()
        t0, done = time.perf_counter(), 0
        while done < spec["flops"]:
            for x, w, c in mats:
                for _ in range(c):
                    F.linear(x, w)
            done += per_set
        out.append({"t": time.perf_counter() - t0, "flops": done})
        if turn is not None:
            turn.passed(hold=k == spec["steps"] - 1)
    print("@@RESULT " + json.dumps({"turns": out}))


if __name__ == "__main__":
    main()
