"""Turn taking for our stages in bench/stage_bench.py (bench/turns.py), installed without touching them.

bench/stage_bench.py puts this folder first on PYTHONPATH and sets ``BENCH_TURNS`` for our run only;
Python imports ``sitecustomize`` at start-up in the CLI process and in every rank it spawns. When
``stackllama_ds.run.stage`` is imported, ``StageRun.beat`` waits for this side's slot when the stage
enters the phase that opens a step (``BENCH_TURN_PHASE``: "training" for SFT and RM, "actor
generation" for PPO) and ``StageRun.end_step`` passes the slot on (kept at the final step, whose
checkpoint and export are not timed). Without ``BENCH_TURNS`` nothing happens.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

_TARGET = "stackllama_ds.run.stage"


def _patch(mod) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for turns.py
    import turns

    t = turns.from_env()
    phase = os.environ["BENCH_TURN_PHASE"]
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
