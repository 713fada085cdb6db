"""Where a LoRA SFT step on SmolLM2-135M goes: our engine vs a plain torch loop (TRL's recipe).

    python bench/lora_profile.py                      # bf16, ZeRO-0, seq 512 x micro 2, 4 steps
    python bench/lora_profile.py --torch-profile      # also the top-10 operators of one step of each

One process, 1 rank, random token ids (the cost does not depend on them). Times forward, backward
and optimizer step (mean of the steps after the first) for (a) our engine as ``stages/sft.py``
builds it (``load_causal_lm`` with smollm2.yaml's LoRA, ``build_train_engine``) and (b) what TRL
runs: the base loaded in the run's dtype, peft LoRA (adapters fp32), ``torch.autocast``, fused
AdamW over the adapters, grad-norm clipping.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import lora_bench  # noqa: E402


def timed(step, batch, steps: int) -> dict[str, float]:
    tot = {"forward": 0.0, "backward": 0.0, "step": 0.0}
    for i in range(steps):
        t = step(batch)
        if i:
            for k in tot:
                tot[k] += t[k]
    return {k: v / (steps - 1) for k, v in tot.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--torch-profile", action="store_true")
    a = ap.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29563",
                      DS_ACCELERATOR="cpu")
    import torch

    from stackllama_ds.config import EngineConfig, LoraConfig, ModelConfig, OptimConfig
    from stackllama_ds.engines import dist
    from stackllama_ds.engines.build import build_train_engine
    from stackllama_ds.models.load import DTYPES, apply_lora, load_causal_lm

    dtype = lora_bench.resolved_dtype()
    sc = lora_bench.smol()["sft"]
    seq, mb = sc["seq_length"], sc["engine"]["micro_batch_size"]
    folder = lora_bench.model_dir()
    torch.set_num_threads(os.cpu_count())
    dist.init("gloo", 120)
    lora = LoraConfig(enabled=True, **lora_bench.lora_spec(sc["lora"]))
    mcfg = ModelConfig(name_or_path=str(folder))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (mb, seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    # (a) ours, as stages/sft.py builds it
    model = load_causal_lm(folder, mcfg, dtype="fp32", lora=lora)
    eng = EngineConfig(zero_stage=a.zero, dtype=dtype, micro_batch_size=mb)
    engine = build_train_engine(model, eng, OptimConfig(**sc["optim"]), total_steps=100, grad_accum=1)

    def ours(b):
        t0 = time.perf_counter()
        out = engine(**b)
        t1 = time.perf_counter()
        engine.backward(out.loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2}

    # (b) TRL's recipe: base in the run's dtype, fp32 adapters, autocast, fused AdamW, clipping
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype])
    ref = apply_lora(ref, lora, "CAUSAL_LM", quantized=False)
    for p in ref.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def plain(b):
        t0 = time.perf_counter()
        with ac:
            out = ref(**b)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2}

    res: dict[str, list[dict]] = {"ours": [], "plain": []}
    for _ in range(a.rounds):
        res["ours"].append(timed(ours, batch, a.steps))
        res["plain"].append(timed(plain, batch, a.steps))
    rows = []
    for k, v in res.items():
        m = {x: common.median([r[x] for r in v]) for x in ("forward", "backward", "step")}
        tot = sum(m.values())
        rows.append([k, m["forward"], m["backward"], m["step"], tot, mb * seq / tot])
    print(common.table(["", "forward s", "backward s", "optimizer s", "step s", "tok/s"], rows,
                       f"LoRA SFT step split ({dtype}, ours ZeRO-{a.zero}, seq {seq} x micro {mb}, "
                       f"load average {lora_bench.load_avg()})"))
    if a.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("ours", ours), ("plain", plain)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn(batch)
            print(f"\n{name}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
