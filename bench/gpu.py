"""GPU benchmarks (CUDA only) and the helpers of bench/gpu_check.sh.

    python bench/gpu.py [--gpus 8 --steps 20]    # prints "no CUDA device: skipped" without a GPU
    python bench/gpu.py --steps 6 --warmup 2 --ppo-steps 3 --out DIR --data PREPARED --json DIR/bench_gpu.json

On a ~1B Llama (hidden 2048, 16 layers, a 32k BPE trained on the beer dump), bf16, every GPU of the node:
SFT tokens/s and MFU (6 x params FLOP per token over an 8192^3 bf16 matmul's rate) at ZeRO-2 and ZeRO-3;
PPO rollout tokens/s and step split; LoRA PPO as configs/smollm2.yaml on it and on SmolLM2-135M (when
fetched), with generation's share of the step (goal <= 50%); RM pairs/s; nvidia-smi's peak memory per GPU.
--json is rewritten after each part, so a run stopped by gpu_check.sh's timeout keeps what it measured.

gpu_check.sh's helpers (`python bench/gpu.py TOOL ...`):
    preflight --json OUT/env.json        versions, GPU, imports; exit 1 if a required one is missing
    report OUT [--work DIR --model TEXT] OUT/summary.md + OUT/summary.json
    slim-wheel WHEEL --keep cpu,cuda13   drop bitsandbytes' other CUDA builds
    pack-model OUT [--weights]           SmolLM2's config + tokenizer (+ bf16 weights) to carry
    init-model SRC OUT [--dtype fp32]    random weights (seed 0) at SRC's config.json
    reload DIR --seconds S --json F      load an export with plain transformers, score a text
    figure preflight|ppo|export|resume|bench ...   one check's `GPU-CHECK` figure; exit 1 on bad evidence
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

MODEL_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
            "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096}
GiB = float(2**30)
PHASES = ("t_generate", "t_score", "t_logprobs", "t_train")


def load(path: Path | None):
    """A JSON file's content, or None where it is missing or unreadable (a check stopped early)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, AttributeError):
        return None


def rows_of(path: Path) -> list[dict]:
    try:
        return h.read_jsonl(path)
    except (OSError, ValueError):
        return []


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------------ the benchmark
def smi_used_mib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10).stdout
    return max(map(float, out.split()), default=0.0)


def run_stage(root: Path, stage: str, name: str, gpus: int, model_dir: Path | None = None,
              **sections) -> tuple[list[dict], float]:
    """One stage in its own processes: its metrics rows and the nvidia-smi peak in GB; PPO's sft/model and
    rm/model are ``model_dir`` (default the ~1B)."""
    run, model = root / f"gpu-{name}", model_dir or root / "tiny"
    links = {"data": root / "data", "tiny": root / "tiny", **({"sft/model": model, "rm/model": model}
                                                               if stage == "ppo" else {})}
    cfg = h.write_config(run, h.TINY_YAML, links, model={"tiny": MODEL_1B}, launch={"nproc_per_node": gpus},
                         **sections)
    with h.Peak(smi_used_mib) as peak:
        r, _ = h.run_measured([sys.executable, "-m", "stackllama_ds.cli", stage, str(cfg)], cuda=True,
                              extra_env={"GPU_CHECK_RUN": f"bench-{name}"})
    h.check(r, f"gpu {name}")
    rows = [x for x in h.read_jsonl(run / stage / "metrics.jsonl") if "elapsed_s" in x]
    h.rmtree(run)
    return rows, peak.peak / 1024


def step_mean(rows: list[dict], warmup: int) -> float:
    """Mean seconds per step from cumulative elapsed_s, the warm-up and the last (it evaluates) left out."""
    e = [x["elapsed_s"] for x in rows[:-1]]
    return mean([b - a for a, b in zip(e, e[1:])][max(0, warmup - 1):])


def bench(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=0, help="default: every visible GPU")
    ap.add_argument("--steps", type=int, default=12, help="SFT and RM optimizer steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ppo-steps", type=int, default=6, help="PPO steps; the first two not averaged")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=h.OUT, help="for the model and the runs")
    ap.add_argument("--data", type=Path, default=None, help="prepared data to link")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    a = ap.parse_args(argv)
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        print("no CUDA device: skipped")
        return 0
    gpus = a.gpus or n
    root = h.ensure_root(a.out / "gpu_root", MODEL_1B, a.data)
    params, rate = h.n_params(root / "tiny"), h.matmul_rate("bf16", 8192, reps=10, device="cuda")
    res: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "params": params,
                 "bf16_tflops": rate / 1e12, "sft": [], "ppo_lora": []}
    print(f"# GPU: {res['gpu']} x {gpus}; model {params / 1e9:.2f}B params; bf16 8192^3 matmul "
          f"{rate / 1e12:.0f} TFLOP/s per GPU")

    def save() -> None:
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))

    bf16 = {"dtype": "bf16"}
    z2 = {"zero_stage": 2, **bf16}
    for zero in (2, 3):
        engine = {"zero_stage": zero, **bf16, "micro_batch_size": a.micro_batch,
                  "gradient_accumulation_steps": 1, "gradient_checkpointing": True}
        rows, peak = run_stage(root, "sft", f"sft-z{zero}", gpus, sft={
            "seq_length": a.seq, "max_steps": a.steps, "eval_every": 10_000, "eval_batches": 1,
            "save_every": 10_000, "engine": engine})
        tps = a.micro_batch * a.seq * gpus / step_mean(rows, a.warmup)
        res["sft"].append({"zero": zero, "tokens_s": tps, "tokens_s_gpu": tps / gpus,
                           "mfu": tps * 6 * params / (rate * gpus), "peak_gb": peak})
        save()
    print(h.table(["SFT bf16", "tokens/s", "tokens/s/GPU", "MFU", "peak GB/GPU"],
                  [[f"ZeRO-{s['zero']}", s["tokens_s"], s["tokens_s_gpu"], f"{100 * s['mfu']:.0f}%",
                    s["peak_gb"]] for s in res["sft"]], "SFT"))

    def ppo(name: str, model_dir: Path | None, batch: int, **sections) -> dict:
        """PPO's step split, averaged over the steps after the first two."""
        rows, peak = run_stage(root, "ppo", name, gpus, model_dir, ppo={
            "steps": a.ppo_steps, "batch_size": batch, "gradient_accumulation_steps": 1,
            "early_stopping": False, "save_every": 10_000, "log_samples": 0, **sections})
        rows = rows[min(2, len(rows) - 1):]
        avg = {k: mean([x[k] for x in rows]) for k in (*PHASES, "response_len")}
        step = sum(avg[k] for k in PHASES)
        return {**avg, "rollout_tokens_s": batch * gpus * avg["response_len"] / avg["t_generate"],
                "step_s": step, "generate_share": avg["t_generate"] / step, "peak_gb": peak,
                "steps_averaged": len(rows)}

    def ppo_table(label: str, title: str, ps: list[tuple[str, dict]]) -> str:
        return h.table([label, "rollout tok/s", "generate s", "score s", "log-probs s", "train s", "step s",
                        "generate share", "peak GB/GPU"],
                       [[k, p["rollout_tokens_s"], *(p[x] for x in PHASES), p["step_s"],
                         f"{100 * p['generate_share']:.0f}%", p["peak_gb"]] for k, p in ps], title)

    res["ppo"] = ppo("ppo", None, 16, mini_batch_size=4, ppo_epochs=4, response_min_length=128,
                     response_max_length=128, max_prompt_length=512, lora={"enabled": False}, actor=z2,
                     critic=z2)
    save()
    print(ppo_table("PPO", "PPO (batch 16/GPU, 128 new tokens, 4 epochs)", [("ZeRO-2 actor", res["ppo"])]))
    # LoRA PPO as configs/smollm2.yaml and stage_bench.py (issue 16): r16 on q/v, the reference = the adapter
    # disabled; goal: generation <= 50% of the step (peers report 80-90%).
    cache = Path(os.environ.get("STACKLLAMA_CACHE", Path.home() / ".cache" / "stackllama-ds"))
    for label, mdir in (("~1B Llama", root / "tiny"), ("SmolLM2-135M", cache / "models" / "smollm2-135m")):
        if not (mdir / "config.json").exists():
            print(f"LoRA PPO on {label}: {mdir} not there (stackllama-ds fetch-model): skipped")
            continue
        res["ppo_lora"].append({"model": label, **ppo(
            f"ppo-lora-{mdir.name}", mdir, 8, mini_batch_size=2, forward_batch_size=8, ppo_epochs=2,
            response_min_length=48, response_max_length=48, max_prompt_length=320,
            lora={"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05}, actor=z2,
            reward={"zero_stage": 0, **bf16})})
        save()
    if res["ppo_lora"]:
        print(ppo_table("LoRA PPO", "LoRA PPO (batch 8/GPU, mini batch 2, 2 epochs, 48 new tokens; goal: "
                        "generate <= 50%)", [(p["model"], p) for p in res["ppo_lora"]]))
    rows, peak = run_stage(root, "rm", "rm", gpus, rm={
        "init_from": str(root / "tiny"), "max_length": 512, "max_steps": a.steps, "eval_every": 10_000,
        "save_every": 10_000, "lora": {"enabled": False},
        "engine": {**z2, "micro_batch_size": 8, "gradient_accumulation_steps": 1}})
    res["rm"] = {"pairs_s": 8 * gpus / step_mean(rows, a.warmup), "peak_gb": peak}
    save()
    print(h.table(["RM bf16", "pairs/s", "peak GB/GPU"], [["ZeRO-2", res["rm"]["pairs_s"], peak]], "RM"))
    return 0


# ------------------------------------------------------------------------------ gpu_check.sh's helpers
REQUIRED = ("torch", "deepspeed", "pydantic", "datasets", "transformers", "peft", "accelerate",
            "html_to_markdown", "yaml", "lxml", "safetensors", "tokenizers")
OPTIONAL = {"bitsandbytes": "8-/4-bit bases", "gguf": "converting the SmolLM2 wheel"}
DISTS = ("torch", "deepspeed", "transformers", "peft", "accelerate", "datasets", "pydantic", "bitsandbytes",
         "tokenizers", "safetensors", "html-to-markdown", "numpy", "pyarrow", "huggingface-hub", "triton")


def preflight(a) -> int:
    """What the GPU machine has: python, torch/CUDA, the GPU, the packages; 1 if a required import fails."""
    from importlib import metadata

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "imports": {},
                  "versions": {}}
    for mod in (*REQUIRED, *OPTIONAL):
        t = time.time()
        try:
            m = __import__(mod)
            info["imports"][mod] = {"ok": True, "file": getattr(m, "__file__", None),
                                    "s": round(time.time() - t, 1)}
        except Exception as e:  # a broken install raises more than ImportError
            info["imports"][mod] = {"ok": False,
                                    "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    for dist in DISTS:
        try:
            info["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info["versions"][dist] = None
    try:
        import torch

        info.update(cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": p.name, "count": torch.cuda.device_count(),
                           "memory_gb": p.total_memory / GiB, "capability": f"{p.major}.{p.minor}",
                           "bf16": torch.cuda.is_bf16_supported()}
    except Exception as e:
        info["cuda_error"] = str(e)[:200]
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20).stdout
        info["nvcc"] = (nvcc.strip().splitlines() or [""])[-1]
    except (OSError, subprocess.TimeoutExpired):
        info["nvcc"] = None  # not needed: the engines use torch's fused AdamW
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(info, indent=1))
    for m in (*OPTIONAL, *REQUIRED):
        if not info["imports"][m]["ok"]:
            kind = f"optional {m} missing ({OPTIONAL[m]})" if m in OPTIONAL else f"required {m} missing"
            print(f"preflight: {kind}: {info['imports'][m]['error']}")
    print(json.dumps({k: info.get(k) for k in ("python", "cuda", "gpu", "nvcc", "versions")}, indent=1))
    return int(any(not info["imports"][m]["ok"] for m in REQUIRED))


FIGURES = {"sft": ("loss", "eval_loss", "tokens_per_s"), "rm": ("loss", "eval_accuracy", "pairs_per_s"),
           "ppo": ("reward_mean", "kl", "response_len", "t_generate", "t_train"), "eval": ()}


def stage_figures(work: Path) -> list[dict]:
    """For every run root under ``work``: each stage's DONE marker, last step and a few last values."""
    out = []
    for run in sorted(p for p in work.iterdir() if (p / "data").exists() and not p.is_symlink()):
        for stage, keys in FIGURES.items():
            sd = run / stage
            if not sd.is_dir() or sd.is_symlink():
                continue
            row = {"run": run.name, "stage": stage, "done": (sd / "DONE").exists()}
            if stage == "eval":
                ev = load(sd / "eval.json") or {}
                row.update(ppo_vs_sft_win=ev.get("win_rates", {}).get("ppo_vs_sft", {}).get("mean"),
                           n_prompts=ev.get("n_prompts"))
            else:
                rows = rows_of(sd / "metrics.jsonl")
                for k in ("step", *keys):
                    last = next((r[k] for r in reversed(rows) if r.get(k) is not None), None)
                    row["steps" if k == "step" else k] = last
            out.append(row)
    return out


def memory_rows(out: Path) -> list[dict]:
    """Measured CUDA peaks (max over the ranks of a stage process) beside the planner's figures."""
    meas: dict[tuple[str, str], dict] = {}
    for r in filter(None, map(load, sorted((out / "mem").glob("*.json")))):
        key = (r.get("run") or "?", r["stage"])
        if key not in meas or r["max_allocated"] > meas[key]["max_allocated"]:
            meas[key] = r
    plans = {j["run"]: j["stages"] for j in filter(None, map(load, out.glob("plan-*.json")))}
    rows = []
    for (run, stage), r in sorted(meas.items()):
        pl = plans.get(run, {}).get(stage, {})
        alloc, live = r["max_allocated"] / GiB, pl.get("live_gb")
        rows.append({"run": run, "stage": stage, "max_allocated_gb": alloc,
                     "max_reserved_gb": r["max_reserved"] / GiB, "plan_live_gb": live,
                     "plan_total_gb": pl.get("total_gb"),
                     "plan_error": (live - alloc) / alloc if live is not None and alloc > 0 else None})
    return rows


def read_steps(out: Path) -> list[dict]:
    """gpu_check.sh's steps.tsv: name, status, rc, seconds, timeout, start, note."""
    try:
        lines = (out / "steps.tsv").read_text().splitlines()
    except OSError:
        return []
    steps = [{"name": f[0], "status": f[1], "rc": f[2], "seconds": int(f[3]), "timeout_s": int(f[4]),
              "started_s": int(f[5]), "note": f[6]} for f in (x.split("\t") for x in lines) if len(f) >= 7]
    return sorted(steps, key=lambda s: s["started_s"])


def report(a) -> int:
    """summary.md and summary.json from what gpu_check.sh left in OUT (steps, memory, plans, bench)."""
    out = Path(a.args[0])
    work = a.work or out / "work"
    env, steps, mem = load(out / "env.json") or {}, read_steps(out), memory_rows(out)
    figs, bench_res = stage_figures(work) if work.is_dir() else [], load(out / "bench_gpu.json")
    counts = {s: sum(x["status"] == s for x in steps) for s in ("pass", "fail", "timeout", "skipped", "dry")}
    gpu, dry = env.get("gpu") or {}, counts["dry"]

    def gb(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [f"# GPU check: {gpu.get('name', 'no CUDA device')} ({gpu.get('memory_gb', 0):.0f} GiB), torch "
             f"{(env.get('versions') or {}).get('torch', '?')} (CUDA {env.get('cuda', '?')}), "
             f"python {env.get('python', '?')}; model: {a.model or '?'}", "",
             f"{counts['pass']} passed, {counts['fail']} failed, {counts['timeout']} timed out, "
             f"{counts['skipped']} skipped{f', {dry} dry (commands only)' if dry else ''}. "
             "Logs: `logs/<step>.log`.", ""]
    if (out / "figures.txt").exists():  # the `GPU-CHECK <name>: <figure>` lines, as printed
        lines += ["```", *(out / "figures.txt").read_text().splitlines(), "```", ""]
    step_rows = [[s[k] for k in ("name", "status", "seconds", "timeout_s", "started_s", "note")]
                 for s in steps]
    gbs = ("max_allocated_gb", "max_reserved_gb", "plan_live_gb", "plan_total_gb")
    mem_rows = [[m["run"], m["stage"], *(gb(m[k]) for k in gbs),
                 "-" if m["plan_error"] is None else f"{100 * m['plan_error']:+.0f}%"] for m in mem]
    lines += [h.table(["step", "status", "s", "timeout s", "started at s", "note"], step_rows, "## Steps"),
              "",
              "## Memory: `stackllama-ds plan` vs `torch.cuda.max_memory_allocated` (GiB, 1 GPU, per stage "
              "process)", "", "plan live = the stage peak without the planner's fixed 1.5 GiB and 10% slack "
              "(neither is in max_memory_allocated); error = (plan live - allocated) / allocated.",
              h.table(["run", "stage", "max allocated", "max reserved", "plan live", "plan stage peak",
                       "error"], mem_rows)]
    if figs:
        keys = [k for k in ("done", "steps", *{k: 0 for ks in FIGURES.values() for k in ks}, "ppo_vs_sft_win")
                if any(f.get(k) is not None for f in figs)]
        fig_rows = [[f["run"], f["stage"], *("-" if f.get(k) is None else f[k] for k in keys)] for f in figs]
        lines.append(h.table(["run", "stage", *keys], fig_rows, "## Stage figures (last logged values)"))
    if bench_res:
        rows = [[f"SFT ZeRO-{s['zero']}", f"{s['tokens_s']:,.0f} tok/s", f"MFU {100 * s['mfu']:.0f}%",
                 f"{s['peak_gb']:.1f}"] for s in bench_res.get("sft", [])]
        if p := bench_res.get("ppo"):
            rows.append(["PPO ZeRO-2", f"{p['rollout_tokens_s']:,.0f} rollout tok/s",
                         f"step {p['step_s']:.2f} s (generate {p['t_generate']:.2f})", f"{p['peak_gb']:.1f}"])
        if r := bench_res.get("rm"):
            rows.append(["RM ZeRO-2", f"{r['pairs_s']:.1f} pairs/s", "", f"{r['peak_gb']:.1f}"])
        lines += ["", f"## bench/gpu.py ({bench_res['params'] / 1e9:.2f}B Llama, bf16 matmul "
                      f"{bench_res['bf16_tflops']:.0f} TFLOP/s)",
                  h.table(["run", "throughput", "", "nvidia-smi peak GB"], rows)]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"env": env, "model": a.model, "counts": counts,
                                                  "steps": steps, "memory": mem, "figures": figs,
                                                  "bench": bench_res}, indent=1))
    print(text)
    return 0


def slim_wheel(a) -> int:
    """Rewrite a bitsandbytes wheel without the native libraries whose names match none of --keep."""
    wheel, keep = Path(a.args[0]), [k for k in a.keep.split(",") if k]

    def dropped(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return (base.startswith("libbitsandbytes_") and base.endswith((".so", ".dll", ".dylib"))
                and not any(base[len("libbitsandbytes_"):].startswith(k) for k in keep))

    tmp, before = wheel.with_suffix(".tmp"), wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in (i for i in src.infolist() if not dropped(i.filename)):
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(x for x in data.decode().splitlines(keepends=True)
                               if not dropped(x.split(",", 1)[0])).encode()
            dst.writestr(item, data)
    os.replace(tmp, wheel)
    print(f"{wheel.name}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB (kept {a.keep})")
    return 0


SMOLLM2_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja")


def pack_model(a) -> int:
    """SmolLM2-135M for the GPU machine (gpu_check.sh --fetch): config, tokenizer and chat template, and with
    --weights its weights in bf16 (too large for the device tool's limit)."""
    from stackllama_ds.fsutil import publish_folder
    from stackllama_ds.models.fetch import resolve_model

    out, src = Path(a.args[0]), resolve_model("smollm2-135m")  # the cache's converted folder (fetched once)
    with publish_folder(out) as tmp:
        for name in (n for n in SMOLLM2_FILES if (src / n).exists()):
            shutil.copy2(src / name, tmp / name)
        if a.weights:
            import torch
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).save_pretrained(str(tmp))
        weights = "bf16" if a.weights else "none: gpu.py init-model draws them"
        (tmp / "SOURCE.md").write_text(f"SmolLM2-135M-Instruct from {src} (stackllama-ds fetch-model "
                                       f"smollm2-135m); weights: {weights}\n")
    print(f"{out}: {sum(p.stat().st_size for p in out.iterdir()) / 2**20:.1f} MiB")
    return 0


def init_model(a) -> int:
    """A model folder with random weights (torch seed 0) at SRC's config.json and SRC's other files: where
    weights cannot travel the checks run its architecture and tokenizer (same shapes and speed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stackllama_ds.fsutil import publish_folder

    src, out = map(Path, a.args[:2])
    with publish_folder(out) as tmp:
        for p in src.iterdir():
            if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".safetensors.index.json")):
                shutil.copy2(p, tmp / p.name)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)),
                                                 dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
        model.save_pretrained(str(tmp))
        (tmp / "SOURCE.md").write_text(f"random weights (torch seed 0, {a.dtype}) at {src}'s config.json\n")
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random ({a.dtype})")
    return 0


def reload_check(a) -> int:
    """Load an exported folder with plain transformers and score one text: the export is usable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, dev = Path(a.args[0]), "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder),
                                                 dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    ids = tok("How long should I let a stout age in the bottle before it tastes its best?",
              return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        nll = float(model.to(dev)(input_ids=ids, labels=ids).loss)
    mib = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    res = {"seconds": a.seconds, "mib": mib, "device": dev, "tokens": ids.shape[1], "nll": nll}
    a.json.write_text(json.dumps(res))
    print(res)
    return 0 if math.isfinite(nll) else 1


def step_s(row: dict) -> float:
    return sum(row.get(k) or 0.0 for k in PHASES)


def figure_ppo(a) -> tuple[str, bool]:
    """Last step's split, and the CUDA peak beside `stackllama-ds plan`'s live bytes (to plan-RUN.json)."""
    from stackllama_ds.config_loader import load_config
    from stackllama_ds.plan import model_shape, plan_ppo

    rows = rows_of(a.root / "ppo" / "metrics.jsonl")
    if not rows:
        return f"no PPO metrics in {a.root / 'ppo'}", False
    last, env = rows[-1], load(a.out / "env.json") or {}
    gpu_mem = (env.get("gpu") or {}).get("memory_gb") or 80.0
    cfg = load_config(a.args[1], a.set)
    sp = plan_ppo(cfg, model_shape(cfg), 1, gpu_mem * GiB, "gpu" if env.get("cuda_available") else "cpu")
    live = (sp.total - sp.overhead) / GiB
    stages = {"ppo": {"live_gb": live, "total_gb": sp.total / GiB}}
    plan = {"run": a.run, "gpu_mem_gb": gpu_mem, "stages": stages}
    (a.out / f"plan-{a.run}.json").write_text(json.dumps(plan))
    peaks = [r["max_allocated"] / GiB for r in map(load, a.mem.glob("*.json") if a.mem else [])
             if r and r.get("run") == a.run and r["stage"] == "ppo"]
    mem = (f"peak {max(peaks):.2f} GiB allocated, plan {live:.2f} GiB live, {live / max(peaks) - 1:+.0%}"
           if peaks else f"plan {live:.2f} GiB live, no CUDA peak measured")
    return (f"{step_s(last):.3f} s/step (step {last['step']}: generate {last['t_generate']:.2f} s, train "
            f"{last['t_train']:.2f} s; reward {last['reward_mean']:.3f}, kl {last['kl']:.4f}; {mem})"), True


def figure(a) -> int:
    """The figure of one gpu_check.sh check, one line on stdout (printed after `GPU-CHECK <name>: `); exit 1
    when the check's own evidence is missing or wrong."""
    kind = a.args[0]
    if kind == "preflight":
        env = load(a.env) or {}
        gpu, v = env.get("gpu") or {}, env.get("versions") or {}
        text, ok = (f"{gpu.get('memory_gb', 0.0):.1f} GiB GPU memory ({gpu.get('name', 'no CUDA device')}; "
                    f"torch {v.get('torch')}, CUDA {env.get('cuda')}, python {env.get('python')})"), bool(env)
    elif kind == "ppo":
        text, ok = figure_ppo(a)
    elif kind == "export":
        r = load(a.json)
        ok = bool(r)
        text = (f"{r['seconds']:.1f} s ({r['mib']:.1f} MiB folder; reloaded with transformers on "
                f"{r['device']}: NLL {r['nll']:.3f} over {r['tokens']} tokens)") if ok else \
            f"no reload result ({a.json})"
    elif kind == "resume":
        before, after = rows_of(a.before), rows_of(a.root / "ppo" / "metrics.jsonl")
        kept = 0  # rows of the first run kept as they were (wall-clock fields too): resumed after them
        while kept < min(len(before), len(after)) and after[kept] == before[kept]:
            kept += 1
        new = after[kept:]
        text = (f"{kept} (resumed after step {kept} of {len(before)}; {len(new)} new step(s), the last "
                f"{f'{step_s(new[-1]):.3f} s' if new else 'none'})")
        in_order = [r["step"] for r in after] == list(range(1, len(after) + 1))
        ok = bool(new) and kept == len(before) > 0 and in_order
    else:
        res = load(a.json) or {}
        sft = next((s for s in res.get("sft", []) if s["zero"] == 2), None)
        ppo = f"; PPO step {res['ppo']['step_s']:.2f} s" if "ppo" in res else ""
        ok = bool(sft)
        text = (f"{100 * sft['mfu']:.1f} % MFU (SFT ZeRO-2, {sft['tokens_s']:,.0f} tokens/s, "
                f"{res['params'] / 1e9:.2f}B Llama{ppo})") if ok else \
            "no SFT figure (bench/gpu.py stopped before its first part)"
    print(text)
    return 0 if ok else 1


TOOLS = {"preflight": preflight, "report": report, "slim-wheel": slim_wheel, "pack-model": pack_model,
         "init-model": init_model, "reload": reload_check, "figure": figure}


def tools(argv: list[str]) -> int:
    """One parser for every helper: TOOL, its positional paths, and the options the module docstring names."""
    ap = argparse.ArgumentParser(prog="gpu.py", description="gpu_check.sh's helpers (see the module's doc)")
    ap.add_argument("tool", choices=TOOLS)
    ap.add_argument("args", nargs="*", help="report: OUT; slim-wheel: WHEEL; pack-model: OUT; init-model: "
                    "SRC OUT; reload: DIR; figure: KIND [CONFIG]")
    for opt in ("--json", "--work", "--env", "--root", "--mem", "--out", "--before"):
        ap.add_argument(opt, type=Path)
    ap.add_argument("--set", action="append", default=[], help="figure ppo: the run's config overrides")
    ap.add_argument("--run", help="figure ppo: the check's name")
    ap.add_argument("--model", default="", help="report: which model the runs used")
    ap.add_argument("--seconds", type=float, help="reload: how long the export took")
    ap.add_argument("--keep", default="cpu,cuda13", help="slim-wheel: libbitsandbytes_<part>.so kept")
    ap.add_argument("--weights", action="store_true", help="pack-model: the bf16 weights too")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="init-model")
    return TOOLS[argv[0]](ap.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(tools(sys.argv[1:]) if sys.argv[1:2] and sys.argv[1] in TOOLS else bench(sys.argv[1:]))
