"""``stackllama-ds pipeline CONFIG``: prepare -> make-tiny or fetch-model -> SFT -> RM [-> judge] -> PPO -> eval.

A stage whose folder holds its DONE marker is skipped; an interrupted stage resumes from its own
checkpoint, so rerunning the command after a kill finishes the job without redoing done stages.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

from stackllama_ds.config import RunConfig, resolve_path
from stackllama_ds.run.layout import STAGES, RunLayout, is_done, mark_done

RESULTS = {
    "data": "data/report.json",
    "tiny": "tiny/",
    "sft": "sft/model/",
    "rm": "rm/model/ and rm/accuracy.json",
    "judge": "judge/model/ and judge/accuracy.json",
    "ppo": "ppo/model/",
    "eval": "eval/report.md, eval/eval.json, eval/*.png",
}


def available_stages(cfg: RunConfig | None = None) -> list[str]:
    """The stages the pipeline runs: the judge only where ``judge.enabled``."""
    mods = {"eval": "stackllama_ds.stages.eval", "judge": "stackllama_ds.stages.rm"}
    return [s for s in STAGES if importlib.util.find_spec(mods.get(s, f"stackllama_ds.stages.{s}"))
            and (s != "judge" or (cfg is not None and cfg.judge.enabled))]


def plan_gate(cfg: RunConfig, force: bool) -> bool:
    """Run the memory planner before any stage; refuse a GPU launch that cannot fit unless forced."""
    from stackllama_ds.plan import fits, resolve_target

    # the config's launch shape and this machine's memory (GPU 0, or RAM per rank on CPU)
    tg = resolve_target(cfg)
    ok, msg = fits(cfg, tg.gpus_per_node, tg.gpu_mem, tg.device)
    if tg.device != "gpu":
        ok = True  # CPU: informative only (the OS swaps or kills, nothing to refuse)
    print("[pipeline] memory plan:\n  " + msg.replace("\n", "\n  "), flush=True)
    if not ok and not force:
        print("[pipeline] refusing to launch: the plan does not fit (see `stackllama-ds plan`); pass --force to "
              "launch anyway", flush=True)
        return False
    return True


def run_pipeline(cfg: RunConfig, config_path: str, overrides: list[str], *,
                 run_stage: Callable[[str, str, list[str]], int], force: bool = False) -> int:
    """``run_stage(stage, config_path, overrides)`` runs one training stage and returns its exit code:
    the CLI passes its own (validate, then spawn the ranks), so this module never imports the CLI back."""
    root = cfg.root()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = Path(config_path).resolve().parent
    dd = RunLayout(cfg).data
    if is_done(dd):
        print(f"[pipeline] data: done, skipped ({dd})", flush=True)
    else:
        from stackllama_ds.data.prepare import prepare

        print(f"[pipeline] data: preparing {cfg.data.posts}", flush=True)
        votes = resolve_path(cfg.data.votes, base) if cfg.data.votes else None
        posts = cfg.data.posts
        inputs = resolve_path(posts, base) if isinstance(posts, str) else [resolve_path(p, base) for p in posts]
        prepare(inputs, dd, votes=votes, cfg=cfg.data, seed=cfg.seed,
                workers=cfg.data.workers, skip_bad_rows=cfg.data.skip_bad_rows, site=cfg.data.site)
        mark_done(dd, "prepare")
    if cfg.model.name_or_path == "tiny":
        td = RunLayout(cfg).tiny
        if is_done(td):
            print(f"[pipeline] tiny: done, skipped ({td})", flush=True)
        else:
            from stackllama_ds.models.tiny import make_tiny

            print("[pipeline] tiny: training tokenizer, building tiny Llama", flush=True)
            make_tiny(dd, td, seed=cfg.seed, cfg=cfg.model.tiny)
            mark_done(td, "make-tiny")
    from stackllama_ds.models.fetch import is_known, resolve_model

    if is_known(cfg.model.name_or_path):  # fetched once here rather than raced for by the ranks
        print(f"[pipeline] model: {resolve_model(cfg.model.name_or_path)}", flush=True)
    if not plan_gate(cfg, force):
        return 3
    for stage in available_stages(cfg):
        sd = cfg.stage_dir(stage)
        if is_done(sd):
            print(f"[pipeline] {stage}: done, skipped ({sd})", flush=True)
            continue
        ts = time.time()
        print(f"[pipeline] {stage}: starting on {cfg.launch.nproc_per_node} rank(s)", flush=True)
        code = run_stage(stage, config_path, overrides)
        if code != 0:
            print(f"[pipeline] {stage}: exited {code}; rerun the same command to resume", flush=True)
            return code
        print(f"[pipeline] {stage}: done in {time.time() - ts:.0f}s", flush=True)
    print(f"[pipeline] finished in {time.time() - t0:.0f}s; results under {root}/:")
    for name in ["data", "tiny", *available_stages(cfg)]:
        if name == "tiny" and cfg.model.name_or_path != "tiny":
            continue
        print(f"  {name:5s} {root / RESULTS[name]}")
    return 0
