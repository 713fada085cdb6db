"""GPU benchmarks (run only where CUDA is present): SFT MFU, PPO rollout and step split, RM pairs/s.

    python bench/gpu.py                              # prints "no CUDA device: skipped" without a GPU
    python bench/gpu.py --gpus 8 --steps 20
    python bench/gpu.py --steps 6 --warmup 2 --ppo-steps 3 --out DIR --data PREPARED --json DIR/bench_gpu.json

On a ~1B-parameter Llama built from config (hidden 2048, 16 layers, intermediate 5632, a 32k BPE
tokenizer trained on the beer dump), bf16, all GPUs of the node:
- SFT tokens/s and MFU (6 x params FLOP per token over the bf16 rate of an 8192^3 matmul measured
  here) under ZeRO-2 and ZeRO-3;
- PPO: rollout tokens/s (t_generate) and the step time split, ZeRO-2 actor;
- LoRA PPO as configs/smollm2.yaml (issue 16) on the ~1B model and on SmolLM2-135M (when fetched):
  the step split and generation's share of the step;
- RM pairs/s.
Peak GPU memory per GPU is sampled with nvidia-smi while each run goes (the stages run in their
own processes).

The helpers of `bench/gpu_check.sh` (one prepared command for a GPU machine) live here too:

    python bench/gpu.py preflight --json OUT/env.json          # versions, GPU, imports; exit 1 if one is missing
    python bench/gpu.py memhook DIR                            # DIR/sitecustomize.py: CUDA peak of every stage process
    python bench/gpu.py report OUT [--work DIR]                # OUT/summary.md + OUT/summary.json
    python bench/gpu.py slim-wheel bitsandbytes-*.whl --keep cpu,cuda13   # drop the other CUDA builds
    python bench/gpu.py pack-model .gpu_check/smollm2-135m [--weights]    # SmolLM2's config + tokenizer to carry
    python bench/gpu.py init-model SRC OUT                     # random weights at SRC's config.json
    python bench/gpu.py reload EXPORTED --seconds S --json F   # load an export with transformers, score a text
    python bench/gpu.py figure ppo|export|resume|preflight|bench ...     # one check's `GPU-CHECK` figure
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

MODEL_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
            "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096}
GiB = float(2**30)
STAGES = ("sft", "rm", "ppo", "eval")


def cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


class GpuPeak:
    """Sample nvidia-smi memory.used (MiB) of every GPU every 0.5 s; keep the max."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak = max([self.peak, *(float(x) for x in out.split())])
            except Exception:
                pass

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# ------------------------------------------------------------------------------ the benchmark
def ensure_gpu_root(root: Path, data: Path | None) -> Path:
    """root/data (a link to ``data``, or the beer dump prepared here) and root/tiny (the ~1B model)."""
    from stackllama_ds.config import TinyModelConfig
    from stackllama_ds.config_loader import load_config
    from stackllama_ds.models.tiny import make_tiny

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data").exists():
        if data is not None:
            (root / "data").symlink_to(data.resolve())
        else:
            from stackllama_ds.data.prepare import prepare

            cfg = load_config(h.TINY_YAML, check_files=False)
            prepare(h.BEER, root / "data", cfg=cfg.data, seed=cfg.seed, log=lambda *a, **k: None)
    if not (root / "tiny" / "config.json").exists():
        make_tiny(root / "data", root / "tiny", seed=0, cfg=TinyModelConfig(**MODEL_1B))
    return root


def bf16_rate() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)


def child_env() -> dict[str, str]:
    """harness.env() for CUDA: no DS_ACCELERATOR=cpu, and the caller's PYTHONPATH kept behind the repo
    (gpu_check.sh puts carried wheels and its memory hook there)."""
    env = h.env()
    env.pop("DS_ACCELERATOR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(h.REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def run_stage(root: Path, stage: str, name: str, gpus: int, model_dir: Path | None = None,
              **sections) -> tuple[list[dict], float]:
    """One stage in its own processes; PPO's sft/model and rm/model are ``model_dir`` (default the ~1B)."""
    run = root / f"gpu-{name}"
    links = {"data": root / "data", "tiny": root / "tiny"}
    if stage == "ppo":
        links.update({"sft/model": model_dir or root / "tiny", "rm/model": model_dir or root / "tiny"})
    cfg = h.write_config(run, h.TINY_YAML, links, model={"tiny": MODEL_1B}, launch={"nproc_per_node": gpus},
                         **sections)
    env = child_env()
    env["GPU_CHECK_RUN"] = f"bench-{name}"
    with GpuPeak() as peak:
        r = subprocess.run([sys.executable, "-m", "stackllama_ds.cli", stage, str(cfg)], cwd=h.REPO, env=env,
                           capture_output=True, text=True)
    h.check(r, f"gpu {name}")
    rows = h.read_jsonl(run / stage / "metrics.jsonl")
    shutil.rmtree(run, ignore_errors=True)
    return [x for x in rows if "elapsed_s" in x], peak.peak


def bench(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=0, help="default: every visible GPU")
    ap.add_argument("--steps", type=int, default=12, help="SFT and RM optimizer steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ppo-steps", type=int, default=6, help="PPO steps; the first two are left out of the averages")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=h.OUT, help="where the model and the runs go (default bench/out)")
    ap.add_argument("--data", type=Path, default=None, help="a prepared data folder to link (default: prepare here)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument("--prepare-only", action="store_true", help="build the data link, tokenizer and model; exit")
    a = ap.parse_args(argv)
    if a.prepare_only:
        ensure_gpu_root(a.out / "gpu_root", a.data)
        return 0
    n = cuda_devices()
    if n == 0:
        print("no CUDA device: skipped")
        return 0
    gpus = a.gpus or n
    root = ensure_gpu_root(a.out / "gpu_root", a.data)
    params = h.n_params(root / "tiny")
    rate = bf16_rate()
    import torch

    res: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "params": params, "bf16_tflops": rate / 1e12}
    print(f"# GPU: {res['gpu']} x {gpus}; model {params / 1e9:.2f}B params; bf16 8192^3 matmul "
          f"{rate / 1e12:.0f} TFLOP/s per GPU")
    sft_rows, res["sft"] = [], []
    for zero in (2, 3):
        rows, peak = run_stage(root, "sft", f"sft-z{zero}", gpus, sft={
            "seq_length": a.seq, "max_steps": a.steps, "eval_every": 10_000, "eval_batches": 1, "save_every": 10_000,
            "engine": {"zero_stage": zero, "dtype": "bf16", "micro_batch_size": a.micro_batch,
                       "gradient_accumulation_steps": 1, "gradient_checkpointing": True}})
        dts = h.step_times([x["elapsed_s"] for x in rows[:-1]], a.warmup)
        tps = a.micro_batch * a.seq * gpus / (sum(dts) / len(dts))
        mfu = tps * 6 * params / (rate * gpus)
        sft_rows.append([f"ZeRO-{zero}", tps, tps / gpus, f"{100 * mfu:.0f}%", peak / 1024])
        res["sft"].append({"zero": zero, "tokens_s": tps, "tokens_s_gpu": tps / gpus, "mfu": mfu,
                           "peak_gb": peak / 1024})
    print(h.table(["SFT bf16", "tokens/s", "tokens/s/GPU", "MFU", "peak GB/GPU"], sft_rows, "SFT"))

    def save() -> None:  # after each part: a step stopped by gpu_check.sh's timeout keeps what it measured
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))

    save()

    rows, peak = run_stage(root, "ppo", "ppo", gpus, ppo={
        "steps": a.ppo_steps, "batch_size": 16, "mini_batch_size": 4, "gradient_accumulation_steps": 1,
        "ppo_epochs": 4, "response_min_length": 128, "response_max_length": 128, "max_prompt_length": 512,
        "early_stopping": False, "save_every": 10_000, "log_samples": 0, "lora": {"enabled": False},
        "actor": {"zero_stage": 2, "dtype": "bf16"}, "critic": {"zero_stage": 2, "dtype": "bf16"}})
    rows = rows[min(2, len(rows) - 1):]
    keys = ("t_generate", "t_score", "t_logprobs", "t_train", "response_len")
    avg = {k: sum(x[k] for x in rows) / len(rows) for k in keys}
    rollout_tps = 16 * gpus * avg["response_len"] / avg["t_generate"]
    step_s = sum(avg[k] for k in keys[:4])
    print(h.table(["PPO", "rollout tok/s", "generate s", "score s", "log-probs s", "train s", "step s",
                        "peak GB/GPU"],
                       [["ZeRO-2 actor", rollout_tps, avg["t_generate"], avg["t_score"], avg["t_logprobs"],
                         avg["t_train"], step_s, peak / 1024]], "PPO (batch 16/GPU, 128 new tokens, 4 epochs)"))
    res["ppo"] = {**avg, "rollout_tokens_s": rollout_tps, "step_s": step_s, "peak_gb": peak / 1024,
                  "steps_averaged": len(rows)}
    save()

    # LoRA PPO as configs/smollm2.yaml and bench/stage_bench.py (issue 16): r16 on q/v, the reference =
    # the adapter disabled, batch 8, mini batch 2, 2 epochs, on the ~1B model and on SmolLM2-135M.
    # Goal: generation <= 50% of the step (peers report 80-90%).
    res["ppo_lora"], lora_rows = [], []
    smol = Path(os.environ.get("STACKLLAMA_CACHE", Path.home() / ".cache" / "stackllama-ds")) / "models" / "smollm2-135m"
    for label, mdir in (("~1B Llama", root / "tiny"), ("SmolLM2-135M", smol)):
        if not (mdir / "config.json").exists():
            print(f"LoRA PPO on {label}: {mdir} not there (stackllama-ds fetch-model): skipped")
            continue
        rows, peak = run_stage(root, "ppo", f"ppo-lora-{mdir.name}", gpus, model_dir=mdir, ppo={
            "steps": a.ppo_steps, "batch_size": 8, "mini_batch_size": 2, "forward_batch_size": 8,
            "gradient_accumulation_steps": 1, "ppo_epochs": 2, "response_min_length": 48, "response_max_length": 48,
            "max_prompt_length": 320, "early_stopping": False, "save_every": 10_000, "log_samples": 0,
            "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05},
            "actor": {"zero_stage": 2, "dtype": "bf16"}, "reward": {"zero_stage": 0, "dtype": "bf16"}})
        rows = rows[min(2, len(rows) - 1):]
        avg = {k: sum(x[k] for x in rows) / len(rows) for k in keys}
        step_s = sum(avg[k] for k in keys[:4])
        tps = 8 * gpus * avg["response_len"] / avg["t_generate"]
        lora_rows.append([label, tps, avg["t_generate"], avg["t_score"], avg["t_logprobs"], avg["t_train"], step_s,
                          f"{100 * avg['t_generate'] / step_s:.0f}%", peak / 1024])
        res["ppo_lora"].append({"model": label, **avg, "rollout_tokens_s": tps, "step_s": step_s,
                                "generate_share": avg["t_generate"] / step_s, "peak_gb": peak / 1024})
    if lora_rows:
        print(h.table(["LoRA PPO", "rollout tok/s", "generate s", "score s", "log-probs s", "train s", "step s",
                            "generate share", "peak GB/GPU"], lora_rows,
                           "LoRA PPO (batch 8/GPU, mini batch 2, 2 epochs, 48 new tokens; goal: generate <= 50%)"))
    save()

    rows, peak = run_stage(root, "rm", "rm", gpus, rm={
        "init_from": str(root / "tiny"), "max_length": 512, "max_steps": a.steps, "eval_every": 10_000,
        "save_every": 10_000, "lora": {"enabled": False},
        "engine": {"zero_stage": 2, "dtype": "bf16", "micro_batch_size": 8, "gradient_accumulation_steps": 1}})
    dts = h.step_times([x["elapsed_s"] for x in rows[:-1]], a.warmup)
    pairs_s = 8 * gpus / (sum(dts) / len(dts))
    print(h.table(["RM bf16", "pairs/s", "peak GB/GPU"], [["ZeRO-2", pairs_s, peak / 1024]], "RM"))
    res["rm"] = {"pairs_s": pairs_s, "peak_gb": peak / 1024}
    save()
    return 0


# ------------------------------------------------------------------------------ gpu_check helpers
MEMHOOK = '''\
# Written by bench/gpu.py memhook for bench/gpu_check.sh: at exit, a stage process (python -m
# stackllama_ds.cli sft|rm|ppo|eval ...) that used CUDA writes its torch.cuda.max_memory_allocated /
# max_memory_reserved to $GPU_CHECK_MEMLOG/<stage>-<pid>.json. Found first on PYTHONPATH; nothing else.
import atexit as _atexit
import os as _os
import sys as _sys
import time as _time

_T0 = _time.time()


def _gpu_check_record():
    try:
        stage = next((a for a in _sys.argv[1:2] if a in ("sft", "rm", "ppo", "eval")), None)
        torch = _sys.modules.get("torch")
        out = _os.environ.get("GPU_CHECK_MEMLOG")
        if stage is None or torch is None or not out or not torch.cuda.is_initialized():
            return
        import json

        row = {"run": _os.environ.get("GPU_CHECK_RUN"), "step": _os.environ.get("GPU_CHECK_STEP"), "stage": stage,
               "rank": int(_os.environ.get("RANK", "0")), "pid": _os.getpid(),
               "max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
               "wall_s": round(_time.time() - _T0, 1), "argv": _sys.argv[1:]}
        with open(_os.path.join(out, f"{stage}-{_os.getpid()}.json"), "w") as f:
            json.dump(row, f)
    except Exception:
        pass


_atexit.register(_gpu_check_record)
'''


def memhook(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu.py memhook")
    ap.add_argument("dir", type=Path)
    a = ap.parse_args(argv)
    a.dir.mkdir(parents=True, exist_ok=True)
    (a.dir / "sitecustomize.py").write_text(MEMHOOK)
    return 0


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


REQUIRED = ("torch", "deepspeed", "pydantic", "datasets", "transformers", "peft", "accelerate", "html_to_markdown",
            "yaml", "lxml", "safetensors", "tokenizers")
OPTIONAL = {"bitsandbytes": "8-/4-bit bases", "gguf": "converting the SmolLM2 wheel"}


def preflight(argv: list[str]) -> int:
    """What the GPU machine has: python, torch/CUDA, the GPU, the packages; exit 1 if a required import fails."""
    ap = argparse.ArgumentParser(prog="gpu.py preflight")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "imports": {}, "versions": {}}
    for mod in (*REQUIRED, *OPTIONAL):
        t = time.time()
        try:
            m = __import__(mod)
            info["imports"][mod] = {"ok": True, "file": getattr(m, "__file__", None), "s": round(time.time() - t, 1)}
        except Exception as e:  # a broken install raises more than ImportError
            info["imports"][mod] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    for dist in ("torch", "deepspeed", "transformers", "peft", "accelerate", "datasets", "pydantic", "bitsandbytes",
                 "tokenizers", "safetensors", "html-to-markdown", "numpy", "pyarrow", "huggingface-hub", "triton"):
        info["versions"][dist] = _version(dist)
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": p.name, "count": torch.cuda.device_count(), "memory_gb": p.total_memory / GiB,
                           "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported()}
    except Exception as e:
        info["cuda_error"] = str(e)[:200]
    try:
        r = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
        info["nvcc"] = (r.stdout.strip().splitlines() or [""])[-1]
    except (OSError, subprocess.TimeoutExpired):
        info["nvcc"] = None  # not needed: the engines use torch's fused AdamW
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(info, indent=1))
    missing = [m for m in REQUIRED if not info["imports"][m]["ok"]]
    for m, what in OPTIONAL.items():
        if not info["imports"][m]["ok"]:
            print(f"preflight: optional {m} missing ({what}): {info['imports'][m]['error']}")
    print(json.dumps({k: info.get(k) for k in ("python", "cuda", "gpu", "nvcc", "versions")}, indent=1))
    if missing:
        for m in missing:
            print(f"preflight: required {m} missing: {info['imports'][m]['error']}")
        return 1
    return 0


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def _last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


FIGURES = {"sft": ("loss", "eval_loss", "tokens_per_s"), "rm": ("loss", "eval_accuracy", "pairs_per_s"),
           "ppo": ("reward_mean", "kl", "response_len", "t_generate", "t_train")}


def stage_figures(work: Path) -> list[dict]:
    """For every run root under ``work``: each stage's DONE marker, last step and a few last values."""
    out = []
    for run in sorted(p for p in work.iterdir() if (p / "data").exists() and not p.is_symlink()):  # run roots
        for stage in STAGES:
            sd = run / stage
            if not sd.is_dir() or sd.is_symlink():
                continue
            row = {"run": run.name, "stage": stage, "done": (sd / "DONE").exists()}
            if stage == "eval":
                try:
                    ev = json.loads((sd / "eval.json").read_text())
                    row["ppo_vs_sft_win"] = ev.get("win_rates", {}).get("ppo_vs_sft", {}).get("mean")
                    row["n_prompts"] = ev.get("n_prompts")
                except (OSError, ValueError):
                    pass
            else:
                rows = _rows(sd / "metrics.jsonl")
                row["steps"] = _last(rows, "step")
                row.update({k: _last(rows, k) for k in FIGURES[stage]})
            out.append(row)
    return out


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def memory_rows(out: Path) -> list[dict]:
    """Measured CUDA peaks (max over the ranks of a stage process) beside the planner's figures."""
    meas: dict[tuple[str, str], dict] = {}
    for p in sorted((out / "mem").glob("*.json")):
        r = _load(p)
        if not r:
            continue
        key = (r.get("run") or "?", r["stage"])
        if key not in meas or r["max_allocated"] > meas[key]["max_allocated"]:
            meas[key] = r
    plans = {}
    for p in out.glob("plan-*.json"):
        j = _load(p)
        if j:
            plans[j["run"]] = j["stages"]
    rows = []
    for (run, stage), r in sorted(meas.items()):
        pl = plans.get(run, {}).get(stage, {})
        alloc, live = r["max_allocated"] / GiB, pl.get("live_gb")
        rows.append({"run": run, "stage": stage, "max_allocated_gb": alloc, "max_reserved_gb": r["max_reserved"] / GiB,
                     "plan_live_gb": live, "plan_total_gb": pl.get("total_gb"),
                     "plan_error": (live - alloc) / alloc if live is not None and alloc > 0 else None})
    return rows


def read_steps(out: Path) -> list[dict]:
    steps = []
    try:
        lines = (out / "steps.tsv").read_text().splitlines()
    except OSError:
        return steps
    for line in lines:
        f = line.split("\t")
        if len(f) >= 7:
            steps.append({"name": f[0], "status": f[1], "rc": f[2], "seconds": int(f[3]), "timeout_s": int(f[4]),
                          "started_s": int(f[5]), "note": f[6]})
    return sorted(steps, key=lambda s: s["started_s"])


def _gb(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(argv: list[str]) -> int:
    """summary.md and summary.json from what gpu_check.sh left in OUT (steps, memory, plans, bench)."""
    ap = argparse.ArgumentParser(prog="gpu.py report")
    ap.add_argument("out", type=Path)
    ap.add_argument("--work", type=Path, default=None, help="the run roots (default OUT/work)")
    ap.add_argument("--model", default="", help="which model the runs used, for the title")
    a = ap.parse_args(argv)
    work = a.work or a.out / "work"
    env = _load(a.out / "env.json") or {}
    steps = read_steps(a.out)
    mem = memory_rows(a.out)
    figs = stage_figures(work) if work.is_dir() else []
    bench_res = _load(a.out / "bench_gpu.json")
    counts = {s: sum(x["status"] == s for x in steps) for s in ("pass", "fail", "timeout", "skipped", "dry")}
    gpu = env.get("gpu") or {}
    lines = [f"# GPU check: {gpu.get('name', 'no CUDA device')} ({gpu.get('memory_gb', 0):.0f} GiB), torch "
             f"{(env.get('versions') or {}).get('torch', '?')} (CUDA {env.get('cuda', '?')}), "
             f"python {env.get('python', '?')}; model: {a.model or '?'}",
             "", f"{counts['pass']} passed, {counts['fail']} failed, {counts['timeout']} timed out, "
             f"{counts['skipped']} skipped{f', {n} dry (commands only)' if (n := counts['dry']) else ''}. "
             "Logs: `logs/<step>.log`.", ""]
    try:  # the `GPU-CHECK <name>: <figure>` lines, as printed when each check finished
        lines += ["```", *(a.out / "figures.txt").read_text().splitlines(), "```", ""]
    except OSError:
        pass
    lines.append(h.table(["step", "status", "s", "timeout s", "started at s", "note"],
                              [[s["name"], s["status"], s["seconds"], s["timeout_s"], s["started_s"], s["note"]]
                               for s in steps], "## Steps"))
    lines += ["", "## Memory: `stackllama-ds plan` vs `torch.cuda.max_memory_allocated` (GiB, 1 GPU, per stage "
              "process)", "", "plan live = the stage peak without the planner's fixed 1.5 GiB and 10% slack "
              "(neither is in max_memory_allocated); error = (plan live - allocated) / allocated."]
    lines.append(h.table(["run", "stage", "max allocated", "max reserved", "plan live", "plan stage peak",
                               "error"],
                              [[m["run"], m["stage"], _gb(m["max_allocated_gb"]), _gb(m["max_reserved_gb"]),
                                _gb(m["plan_live_gb"]), _gb(m["plan_total_gb"]),
                                "-" if m["plan_error"] is None else f"{100 * m['plan_error']:+.0f}%"] for m in mem]))
    if figs:
        keys = ["done", "steps", "loss", "eval_loss", "tokens_per_s", "eval_accuracy", "pairs_per_s", "reward_mean",
                "kl", "response_len", "t_generate", "t_train", "ppo_vs_sft_win"]
        keys = [k for k in keys if any(f.get(k) is not None for f in figs)]
        lines.append(h.table(["run", "stage", *keys],
                                  [[f["run"], f["stage"], *["-" if f.get(k) is None else f[k] for k in keys]]
                                   for f in figs], "## Stage figures (last logged values)"))
    if bench_res:
        lines += ["", f"## bench/gpu.py ({bench_res['params'] / 1e9:.2f}B Llama, bf16 matmul "
                      f"{bench_res['bf16_tflops']:.0f} TFLOP/s)"]
        rows = [[f"SFT ZeRO-{s['zero']}", f"{s['tokens_s']:,.0f} tok/s", f"MFU {100 * s['mfu']:.0f}%",
                 f"{s['peak_gb']:.1f}"] for s in bench_res.get("sft", [])]
        if "ppo" in bench_res:
            p = bench_res["ppo"]
            rows.append(["PPO ZeRO-2", f"{p['rollout_tokens_s']:,.0f} rollout tok/s",
                         f"step {p['step_s']:.2f} s (generate {p['t_generate']:.2f})", f"{p['peak_gb']:.1f}"])
        if "rm" in bench_res:
            rows.append(["RM ZeRO-2", f"{bench_res['rm']['pairs_s']:.1f} pairs/s", "", f"{bench_res['rm']['peak_gb']:.1f}"])
        lines.append(h.table(["run", "throughput", "", "nvidia-smi peak GB"], rows))
    text = "\n".join(lines) + "\n"
    (a.out / "summary.md").write_text(text)
    (a.out / "summary.json").write_text(json.dumps({"env": env, "model": a.model, "counts": counts, "steps": steps,
                                                    "memory": mem, "figures": figs, "bench": bench_res}, indent=1))
    print(text)
    return 0


def slim_wheel(argv: list[str]) -> int:
    """Rewrite a bitsandbytes wheel without the native libraries whose names match none of --keep."""
    ap = argparse.ArgumentParser(prog="gpu.py slim-wheel")
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--keep", default="cpu,cuda13", help="comma-separated parts of libbitsandbytes_<part>.so to keep")
    a = ap.parse_args(argv)
    keep = [k for k in a.keep.split(",") if k]

    def dropped(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return (base.startswith("libbitsandbytes_") and base.endswith((".so", ".dll", ".dylib"))
                and not any(base[len("libbitsandbytes_"):].startswith(k) for k in keep))

    tmp = a.wheel.with_suffix(".tmp")
    with zipfile.ZipFile(a.wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(x for x in data.decode().splitlines(keepends=True)
                               if not dropped(x.split(",", 1)[0])).encode()
            dst.writestr(item, data)
    before = a.wheel.stat().st_size
    os.replace(tmp, a.wheel)
    print(f"{a.wheel.name}: {before / 2**20:.1f} -> {a.wheel.stat().st_size / 2**20:.1f} MiB (kept {a.keep})")
    return 0


SMOLLM2_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja")


def pack_model(argv: list[str]) -> int:
    """SmolLM2-135M for the GPU machine (gpu_check.sh --fetch): config, tokenizer and chat template
    (3.4 MiB), and with --weights its weights in bf16 (257 MiB; too large for the device tool)."""
    ap = argparse.ArgumentParser(prog="gpu.py pack-model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--weights", action="store_true")
    a = ap.parse_args(argv)
    from stackllama_ds.models.fetch import resolve_model

    src = resolve_model("smollm2-135m")  # the cache's converted folder; fetched and converted once if absent
    tmp = a.out.with_name(a.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SMOLLM2_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    if a.weights:
        import torch
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).save_pretrained(str(tmp))
    (tmp / "SOURCE.md").write_text(f"SmolLM2-135M-Instruct from {src} (stackllama-ds fetch-model smollm2-135m); "
                                   f"weights: {'bf16' if a.weights else 'none: gpu.py init-model draws them'}\n")
    shutil.rmtree(a.out, ignore_errors=True)
    os.replace(tmp, a.out)
    print(f"{a.out}: {sum(p.stat().st_size for p in a.out.iterdir()) / 2**20:.1f} MiB")
    return 0


def init_model(argv: list[str]) -> int:
    """A model folder with random weights (torch seed 0) at SRC's config.json; SRC's other files copied.

    Where a model's weights cannot travel, the checks run its architecture and tokenizer: the same
    shapes, memory and speed; the texts are noise."""
    ap = argparse.ArgumentParser(prog="gpu.py init-model")
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = a.out.with_name(a.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in a.src.iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".safetensors.index.json")):
            shutil.copy2(p, tmp / p.name)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(a.src)), dtype=dtype)
    model.save_pretrained(str(tmp))
    (tmp / "SOURCE.md").write_text(f"random weights (torch seed 0, {a.dtype}) at {a.src}'s config.json\n")
    shutil.rmtree(a.out, ignore_errors=True)
    os.replace(tmp, a.out)
    print(f"{a.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random ({a.dtype})")
    return 0


RELOAD_TEXT = "How long should I let a stout age in the bottle before it tastes its best?"


def reload_check(argv: list[str]) -> int:
    """Load an exported folder with plain transformers and score one text: the export is usable."""
    ap = argparse.ArgumentParser(prog="gpu.py reload")
    ap.add_argument("dir", type=Path)
    ap.add_argument("--seconds", type=float, required=True, help="how long the export took")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(str(a.dir))
    model = AutoModelForCausalLM.from_pretrained(str(a.dir), dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    ids = tok(RELOAD_TEXT, return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        nll = float(model.to(dev)(input_ids=ids, labels=ids).loss)
    size = sum(p.stat().st_size for p in a.dir.rglob("*") if p.is_file())
    res = {"seconds": a.seconds, "mib": size / 2**20, "device": dev, "tokens": ids.shape[1], "nll": nll}
    a.json.write_text(json.dumps(res))
    print(res)
    return 0 if math.isfinite(nll) else 1


def _ppo_step_s(row: dict) -> float:
    return sum(row.get(k) or 0.0 for k in ("t_generate", "t_score", "t_logprobs", "t_train"))


def _peak_allocated(mem: Path, run: str, stage: str) -> float | None:
    rows = [r for r in (_load(p) for p in mem.glob("*.json")) if r and r.get("run") == run and r["stage"] == stage]
    return max((r["max_allocated"] for r in rows), default=None)


def figure(argv: list[str]) -> int:
    """The figure of one gpu_check.sh check, one line on stdout (the script prints it after
    `GPU-CHECK <name>: `); exit 1 when the check's own evidence is missing or wrong.

        figure preflight --env OUT/env.json
        figure ppo --root RUN_ROOT --run NAME --mem OUT/mem --out OUT CONFIG [--set a=b ...]
        figure export --json WORK/export.json
        figure resume --root RUN_ROOT --before METRICS_BEFORE.jsonl
        figure bench --json OUT/bench_gpu.json
    """
    ap = argparse.ArgumentParser(prog="gpu.py figure")
    ap.add_argument("kind", choices=("preflight", "ppo", "export", "resume", "bench"))
    ap.add_argument("config", nargs="?")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--env", type=Path)
    ap.add_argument("--root", type=Path)
    ap.add_argument("--run")
    ap.add_argument("--mem", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--before", type=Path)
    a = ap.parse_args(argv)
    if a.kind == "preflight":
        env = _load(a.env) or {}
        gpu, v = env.get("gpu") or {}, env.get("versions") or {}
        print(f"{gpu.get('memory_gb', 0.0):.1f} GiB GPU memory ({gpu.get('name', 'no CUDA device')}; torch "
              f"{v.get('torch')}, CUDA {env.get('cuda')}, python {env.get('python')})")
        return 0 if env else 1
    if a.kind == "ppo":
        rows = _rows(a.root / "ppo" / "metrics.jsonl")
        if not rows:
            print(f"no PPO metrics in {a.root / 'ppo'}")
            return 1
        last = rows[-1]
        text = (f"{_ppo_step_s(last):.3f} s/step (step {last['step']}: generate {last['t_generate']:.2f} s, train "
                f"{last['t_train']:.2f} s; reward {last['reward_mean']:.3f}, kl {last['kl']:.4f}")
        from stackllama_ds.config_loader import load_config
        from stackllama_ds.plan import model_shape, plan_ppo

        env = _load(a.out / "env.json") or {}
        gpu_mem = (env.get("gpu") or {}).get("memory_gb") or 80.0
        on_gpu = bool(env.get("cuda_available"))
        cfg = load_config(a.config, a.set)
        sp = plan_ppo(cfg, model_shape(cfg), 1, gpu_mem * GiB, "gpu" if on_gpu else "cpu")
        live = (sp.total - sp.overhead) / GiB
        (a.out / f"plan-{a.run}.json").write_text(json.dumps(
            {"run": a.run, "gpu_mem_gb": gpu_mem, "stages": {"ppo": {"live_gb": live, "total_gb": sp.total / GiB}}}))
        peak = _peak_allocated(a.mem, a.run, "ppo") if a.mem else None
        if peak is None:
            text += f"; plan {live:.2f} GiB live, no CUDA peak measured)"
        else:
            text += f"; peak {peak / GiB:.2f} GiB allocated, plan {live:.2f} GiB live, {live / (peak / GiB) - 1:+.0%})"
        print(text)
        return 0
    if a.kind == "export":
        r = _load(a.json)
        if not r:
            print(f"no reload result ({a.json})")
            return 1
        print(f"{r['seconds']:.1f} s ({r['mib']:.1f} MiB folder; reloaded with transformers on {r['device']}: "
              f"NLL {r['nll']:.3f} over {r['tokens']} tokens)")
        return 0
    if a.kind == "resume":
        before, after = _rows(a.before), _rows(a.root / "ppo" / "metrics.jsonl")
        kept = 0  # rows of the first run kept as they were (wall-clock fields too): resumed after them
        while kept < min(len(before), len(after)) and after[kept] == before[kept]:
            kept += 1
        ok = kept == len(before) > 0 and [r["step"] for r in after] == list(range(1, len(after) + 1))
        new = after[kept:]
        step_s = f"{_ppo_step_s(new[-1]):.3f} s" if new else "none"
        print(f"{kept} (resumed after step {kept} of {len(before)}; {len(new)} new step(s), the last {step_s})")
        return 0 if ok and new else 1
    res = _load(a.json) or {}
    sft = next((s for s in res.get("sft", []) if s["zero"] == 2), None)
    if sft is None:
        print("no SFT figure (bench/gpu.py stopped before its first part)")
        return 1
    ppo = f"; PPO step {res['ppo']['step_s']:.2f} s" if "ppo" in res else ""
    print(f"{100 * sft['mfu']:.1f} % MFU (SFT ZeRO-2, {sft['tokens_s']:,.0f} tokens/s, {res['params'] / 1e9:.2f}B "
          f"Llama{ppo})")
    return 0


MODES = {"memhook": memhook, "preflight": preflight, "report": report,
         "slim-wheel": slim_wheel, "pack-model": pack_model, "init-model": init_model, "reload": reload_check,
         "figure": figure}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in MODES:
        sys.exit(MODES[sys.argv[1]](sys.argv[2:]))
    sys.exit(bench(sys.argv[1:]))


if __name__ == "__main__":
    main()
