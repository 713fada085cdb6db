"""GPU benchmarks (run only where CUDA is present): SFT MFU, PPO rollout and step split, RM pairs/s.

    python bench/gpu.py                              # prints "no CUDA device: skipped" without a GPU
    python bench/gpu.py --gpus 8 --steps 20

On a ~1B-parameter Llama built from config (hidden 2048, 16 layers, intermediate 5632, a 32k BPE
tokenizer trained on the beer dump), bf16, all GPUs of the node:
- SFT tokens/s and MFU (6 x params FLOP per token over the bf16 rate of an 8192^3 matmul measured
  here) under ZeRO-2 and ZeRO-3;
- PPO: rollout tokens/s (t_generate) and the step time split, ZeRO-2 actor;
- RM pairs/s.
Peak GPU memory per GPU is sampled with nvidia-smi while each run goes (the stages run in their
own processes).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

GPU_ROOT = common.OUT / "gpu_root"
MODEL_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
            "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096}


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


def ensure_gpu_root() -> Path:
    from stackllama_ds.config import TinyModelConfig
    from stackllama_ds.models.tiny import make_tiny

    common.ensure_root()
    GPU_ROOT.mkdir(parents=True, exist_ok=True)
    if not (GPU_ROOT / "data").exists():
        (GPU_ROOT / "data").symlink_to(common.ROOT / "data")
    if not (GPU_ROOT / "tiny" / "config.json").exists():
        make_tiny(GPU_ROOT / "data", GPU_ROOT / "tiny", seed=0, cfg=TinyModelConfig(**MODEL_1B))
    return GPU_ROOT


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


def run_stage(stage: str, name: str, gpus: int, **sections) -> tuple[list[dict], float]:
    run = common.OUT / f"gpu-{name}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = common.write_config(run, root=GPU_ROOT, model=MODEL_1B, launch={"nproc_per_node": gpus}, **sections)
    if stage == "ppo":
        for s in ("sft", "rm"):
            (run / s).mkdir(parents=True, exist_ok=True)
            (run / s / "model").symlink_to(GPU_ROOT / "tiny")
    env = common.env()
    env.pop("DS_ACCELERATOR", None)
    with GpuPeak() as peak:
        r = subprocess.run([sys.executable, "-m", "stackllama_ds.cli", stage, str(cfg)], cwd=common.REPO, env=env,
                           capture_output=True, text=True)
    common.check(r, f"gpu {name}")
    rows = common.read_jsonl(run / stage / "metrics.jsonl")
    shutil.rmtree(run, ignore_errors=True)
    return [x for x in rows if "elapsed_s" in x], peak.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=0, help="default: every visible GPU")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    a = ap.parse_args()
    n = cuda_devices()
    if n == 0:
        print("no CUDA device: skipped")
        return
    gpus = a.gpus or n
    ensure_gpu_root()
    params = common.n_params(GPU_ROOT / "tiny")
    rate = bf16_rate()
    import torch

    print(f"# GPU: {torch.cuda.get_device_name(0)} x {gpus}; model {params / 1e9:.2f}B params; bf16 8192^3 matmul "
          f"{rate / 1e12:.0f} TFLOP/s per GPU")
    sft_rows = []
    for zero in (2, 3):
        rows, peak = run_stage("sft", f"sft-z{zero}", gpus, sft={
            "seq_length": a.seq, "max_steps": a.steps, "eval_every": 10_000, "eval_batches": 1, "save_every": 10_000,
            "engine": {"zero_stage": zero, "dtype": "bf16", "micro_batch_size": a.micro_batch,
                       "gradient_accumulation_steps": 1, "gradient_checkpointing": True}})
        dts = common.step_times([x["elapsed_s"] for x in rows[:-1]], a.warmup)
        tps = a.micro_batch * a.seq * gpus / (sum(dts) / len(dts))
        mfu = tps * 6 * params / (rate * gpus)
        sft_rows.append([f"ZeRO-{zero}", tps, tps / gpus, f"{100 * mfu:.0f}%", peak / 1024])
    print(common.table(["SFT bf16", "tokens/s", "tokens/s/GPU", "MFU", "peak GB/GPU"], sft_rows, "SFT"))

    rows, peak = run_stage("ppo", "ppo", gpus, ppo={
        "steps": 6, "batch_size": 16, "mini_batch_size": 4, "gradient_accumulation_steps": 1, "ppo_epochs": 4,
        "response_min_length": 128, "response_max_length": 128, "max_prompt_length": 512, "early_stopping": False,
        "save_every": 10_000, "log_samples": 0, "lora": {"enabled": False},
        "actor": {"zero_stage": 2, "dtype": "bf16"}, "critic": {"zero_stage": 2, "dtype": "bf16"}})
    rows = rows[2:]
    avg = {k: sum(x[k] for x in rows) / len(rows) for k in ("t_generate", "t_score", "t_logprobs", "t_train",
                                                           "response_len")}
    rollout_tps = 16 * gpus * avg["response_len"] / avg["t_generate"]
    print(common.table(["PPO", "rollout tok/s", "generate s", "score s", "log-probs s", "train s", "step s",
                        "peak GB/GPU"],
                       [["ZeRO-2 actor", rollout_tps, avg["t_generate"], avg["t_score"], avg["t_logprobs"],
                         avg["t_train"], sum(avg[k] for k in ("t_generate", "t_score", "t_logprobs", "t_train")),
                         peak / 1024]], "PPO (batch 16/GPU, 128 new tokens, 4 epochs)"))

    rows, peak = run_stage("rm", "rm", gpus, rm={
        "init_from": str(GPU_ROOT / "tiny"), "max_length": 512, "max_steps": a.steps, "eval_every": 10_000,
        "save_every": 10_000, "lora": {"enabled": False},
        "engine": {"zero_stage": 2, "dtype": "bf16", "micro_batch_size": 8, "gradient_accumulation_steps": 1}})
    dts = common.step_times([x["elapsed_s"] for x in rows[:-1]], a.warmup)
    print(common.table(["RM bf16", "pairs/s", "peak GB/GPU"], [["ZeRO-2", 8 * gpus / (sum(dts) / len(dts)),
                                                                peak / 1024]], "RM"))


if __name__ == "__main__":
    main()
