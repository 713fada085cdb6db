"""Hooks in our stage processes, installed without touching them: Python imports ``sitecustomize`` at start-up
of the CLI and of every rank it spawns when this folder is first on PYTHONPATH. Each acts only where its
variable is set.

``BENCH_TURNS`` (bench/stage_bench.py): turn taking (bench/turns.py). ``StageRun.beat`` waits for this side's
slot when the stage enters ``BENCH_TURN_PHASE`` (the phase that opens a step) and ``StageRun.end_step``
passes it on (kept at the final step, whose checkpoint and export are not timed).

``GPU_CHECK_MEMLOG`` (bench/gpu_check.sh): at exit, a stage process that used CUDA writes its
torch.cuda.max_memory_allocated/reserved to ``$GPU_CHECK_MEMLOG/<stage>-<pid>.json``.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

_TARGET = "stackllama_ds.run.stage"


def _patch(mod) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for turns.py
    import turns

    t, phase = turns.from_env(), os.environ["BENCH_TURN_PHASE"]
    beat, end_step = mod.StageRun.beat, mod.StageRun.end_step

    def gated_beat(self, ph: str, step: int | None = None) -> None:
        if ph == phase and step is None:
            t.wait()
        beat(self, ph, step)

    def timed_end_step(self, save: bool) -> None:
        t.passed(hold=save)  # save_every is out of reach in the benchmark: save marks the last step
        end_step(self, save)

    mod.StageRun.beat, mod.StageRun.end_step = gated_beat, timed_end_step


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(mod) -> None:
            run(mod)
            _patch(mod)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("BENCH_TURNS"):
    sys.meta_path.insert(0, _Hook())


def _record_cuda_peak(t0: float = time.time()) -> None:
    try:
        stage = next((a for a in sys.argv[1:2] if a in ("sft", "rm", "ppo", "eval")), None)
        torch, out = sys.modules.get("torch"), os.environ["GPU_CHECK_MEMLOG"]
        if stage is None or torch is None or not torch.cuda.is_initialized():
            return
        row = {"run": os.environ.get("GPU_CHECK_RUN"), "step": os.environ.get("GPU_CHECK_STEP"),
               "stage": stage, "rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(),
               "max_allocated": torch.cuda.max_memory_allocated(),
               "max_reserved": torch.cuda.max_memory_reserved(), "wall_s": round(time.time() - t0, 1),
               "argv": sys.argv[1:]}
        with open(os.path.join(out, f"{stage}-{os.getpid()}.json"), "w") as f:
            json.dump(row, f)
    except Exception:  # never fail the stage over its measurement
        pass


if os.environ.get("GPU_CHECK_MEMLOG"):
    atexit.register(_record_cuda_peak)
