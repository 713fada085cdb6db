"""Where an SFT step's time goes: our DeepSpeed engine vs a plain torch loop (TRL's recipe).

    python bench/profile_sft.py --dtype bf16 --zero 2 --steps 6

One process, 1 rank: the benchmark Llama, packed batches of ``--micro-batch`` x ``--seq`` tokens.
Times forward, backward and optimizer step separately (mean of the steps after the first), for
(a) our engine as ``stages/sft.py`` builds it (``build_train_engine``) and (b) HF-Trainer style:
fp32 weights, ``torch.autocast`` bf16, fused AdamW, grad-norm clipping. ``--torch-profile`` also
prints the top operators of one step of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def timed_steps(fwd_bwd_step, batches, steps: int) -> dict[str, float]:
    tot = {"forward": 0.0, "backward": 0.0, "step": 0.0}
    for i in range(steps):
        t = fwd_bwd_step(next(batches))
        if i:
            for k in tot:
                tot[k] += t[k]
    return {k: v / (steps - 1) for k, v in tot.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--fused-adam", action="store_true",
                    help="ours with torch's fused AdamW (adds \"fused\": true to the DeepSpeed optimizer params)")
    a = ap.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29561",
                      DS_ACCELERATOR="cpu")
    import torch

    from stackllama_ds.config import EngineConfig, ModelConfig, OptimConfig
    from stackllama_ds.data.packing import packed_batches
    from stackllama_ds.data.prepare import load_prepared, sft_texts
    from stackllama_ds.engines import dist
    from stackllama_ds.engines.build import build_train_engine
    from stackllama_ds.models.load import load_causal_lm, load_tokenizer

    common.ensure_root()
    torch.set_num_threads(os.cpu_count())
    dist.init("gloo", 120)
    tok = load_tokenizer(common.ROOT / "tiny")
    texts = sft_texts(load_prepared(common.ROOT / "data")["sft"])
    mcfg = ModelConfig(name_or_path=str(common.ROOT / "tiny"))

    def batches():
        return packed_batches(texts, tok, a.seq, a.micro_batch, 0, 1, 0)

    # (a) ours
    if a.fused_adam:
        import stackllama_ds.engines.build as build

        def fused_cfg(*args, _orig=build.ds_config, **kw):
            cfg = _orig(*args, **kw)
            if "optimizer" in cfg:
                cfg["optimizer"]["params"]["fused"] = True
            return cfg

        build.ds_config = fused_cfg
    model = load_causal_lm(common.ROOT / "tiny", mcfg, dtype="fp32")
    eng = EngineConfig(zero_stage=a.zero, dtype=a.dtype, micro_batch_size=a.micro_batch)
    engine = build_train_engine(model, eng, OptimConfig(lr=3e-4, warmup_steps=0), total_steps=100, grad_accum=1)

    def ours(b):
        t0 = time.perf_counter()
        out = engine(**b)
        t1 = time.perf_counter()
        engine.backward(out.loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2}

    # (b) HF Trainer's recipe: fp32 weights, autocast, fused AdamW, clip
    ref = load_causal_lm(common.ROOT / "tiny", mcfg, dtype="fp32")
    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16")

    def plain(b):
        t0 = time.perf_counter()
        with ac:
            out = ref(**b)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2}

    res = {"ours": [], "plain": []}
    for _ in range(2):  # alternate
        res["ours"].append(timed_steps(ours, batches(), a.steps))
        res["plain"].append(timed_steps(plain, batches(), a.steps))
    rows = []
    for k, v in res.items():
        m = {x: common.median([r[x] for r in v]) for x in ("forward", "backward", "step")}
        tot = sum(m.values())
        rows.append([k, m["forward"], m["backward"], m["step"], tot, a.micro_batch * a.seq / tot])
    print(common.table(["", "forward s", "backward s", "optimizer s", "step s", "tok/s"], rows,
                       f"SFT step split ({a.dtype}, ours ZeRO-{a.zero}{' fused AdamW' if a.fused_adam else ''}, "
                       f"seq {a.seq} x micro {a.micro_batch})"))
    if a.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("ours", ours), ("plain", plain)):
            it = batches()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn(next(it))
            print(f"\n{name}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
