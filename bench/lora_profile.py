"""Where our LoRA steps on SmolLM2-135M spend their time (issue 16), in one process, 1 rank.

    python bench/lora_profile.py --stage sft|rm              # ours vs a plain torch loop (TRL's recipe)
    python bench/lora_profile.py --stage ppo                 # our PPO phases: generate, log-probs, one update
    python bench/lora_profile.py --stage sft --torch-profile  # + the top-10 operators of one step of each

SFT/RM: random token ids at configs/smollm2.yaml's shapes; forward, backward and optimizer step (mean of
the steps after the first) of our engine as the stage builds it, alternating with what TRL runs (the base
in the run's dtype, fp32 peft adapters, autocast, fused AdamW, grad-norm clipping). PPO: the engines
``build_engines`` makes from smollm2.yaml, the first rl_train prompts; generation, rollout log-probs and
one minibatch update with made-up advantages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import stage_bench  # noqa: E402

SMOL = argparse.Namespace(model="smollm2")  # what stage_bench.model_dir/data_dir read


def timed(step: Callable[[], dict[str, float]], steps: int) -> dict[str, float]:
    """Mean of each phase over the steps after the first."""
    tot: dict[str, float] = {}
    for i in range(steps):
        t = step()
        if i:
            for k, v in t.items():
                tot[k] = tot.get(k, 0.0) + v
    return {k: v / (steps - 1) for k, v in tot.items()}


def top_ops(name: str, fn: Callable[[], object]) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n{name} (load average {h.load_avg()}):\n"
          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def split(forward: Callable[[], object], backward: Callable[[object], object],
          step: Callable[[], object]) -> Callable[[], dict[str, float]]:
    """One timed training step: ``forward()`` returns the loss, then ``backward(loss)``, ``step()``."""
    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        backward(loss)
        t2 = time.perf_counter()
        step()
        return {"forward": t1 - t0, "backward": t2 - t1, "step": time.perf_counter() - t2}
    return run


def plain_lora(model, dtype: str, loss_fn: Callable[[], object], **adamw) -> Callable[[], dict[str, float]]:
    """TRL's recipe around a peft model: fp32 adapters, autocast to the run's dtype, fused AdamW with
    grad-norm clipping; a timed step like ``split``'s."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW(params, fused=True, **adamw)
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def forward() -> object:
        with ac:
            return loss_fn()

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return split(forward, lambda loss: loss.backward(), step)


def compare(a, sides: dict[str, Callable[[], dict[str, float]]], per_step: float, unit: str,
            title: str) -> None:
    """Alternate the sides for ``a.rounds``; print the median split and ``per_step / step s`` in ``unit``."""
    res: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(a.rounds):
        for k, fn in sides.items():
            res[k].append(timed(fn, a.steps))
    rows = []
    for k, v in res.items():
        m = {x: h.median([r[x] for r in v]) for x in ("forward", "backward", "step")}
        tot = sum(m.values())
        rows.append([k, m["forward"], m["backward"], m["step"], tot, per_step / tot])
    print(h.table(["", "forward s", "backward s", "optimizer s", "step s", unit], rows,
                  f"{title}, load average {h.load_avg()})"))
    if a.torch_profile:
        for k, fn in sides.items():
            top_ops(f"{k}, one step", fn)


def profile_sft_rm(a, dtype: str, stage: str) -> None:
    """Our engine as stages/sft.py or stages/rm.py builds it vs TRL's recipe around a peft model. SFT: random
    ids, seq x micro batch; RM: one forward over [chosen..., rejected...] of random ids, --seq each."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from stackllama_ds.config import EngineConfig, ModelConfig
    from stackllama_ds.config_loader import load_config
    from stackllama_ds.engines.build import build_train_engine
    from stackllama_ds.models.load import DTYPES, apply_lora, load_causal_lm, load_reward_model

    st = getattr(load_config(h.SMOL_YAML, check_files=False), stage)
    mb, folder, g = st.engine.micro_batch_size, stage_bench.model_dir(SMOL), torch.Generator().manual_seed(0)
    mcfg = ModelConfig(name_or_path=str(folder))
    if stage == "sft":
        ids = torch.randint(0, 49152, (mb, st.seq_length), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        model = load_causal_lm(folder, mcfg, dtype=dtype, lora=st.lora)
        ref = apply_lora(AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype]), st.lora,
                         "CAUSAL_LM", quantized=False)

        def loss(m) -> torch.Tensor:
            return m(**batch, use_cache=False).loss

        adamw, per_step, unit = {"betas": (0.9, 0.95), "weight_decay": 0.05}, mb * st.seq_length, "tok/s"
        what = f"seq {st.seq_length} x micro {mb}"
    else:
        ids = torch.randint(1, 49152, (2 * mb, a.seq), generator=g)
        model = load_reward_model(folder, mcfg, pad_token_id=0, dtype=dtype, lora=st.lora)
        ref = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1,
                                                                 dtype=DTYPES[dtype])
        ref.config.pad_token_id = 0
        ref = apply_lora(ref, st.lora, "SEQ_CLS", quantized=False)

        def loss(m) -> torch.Tensor:
            r = m(input_ids=ids, use_cache=False).logits.squeeze(-1).float()
            return -F.logsigmoid(r[:mb] - r[mb:]).mean()

        adamw, per_step, unit, what = {}, mb, "pairs/s", f"{mb} pairs x {a.seq} tokens"
    engine = build_train_engine(model, EngineConfig(zero_stage=a.zero, dtype=dtype, micro_batch_size=mb),
                                st.optim, total_steps=100, grad_accum=1)
    sides = {"ours": split(lambda: loss(engine), engine.backward, engine.step),
             "plain (TRL's recipe)": plain_lora(ref, dtype, lambda: loss(ref), lr=1e-4, **adamw)}
    compare(a, sides, per_step, unit, f"LoRA {stage.upper()} step split ({dtype}, ours ZeRO-{a.zero}, {what}")


def profile_ppo(a, dtype: str) -> None:
    import torch

    from stackllama_ds import rl
    from stackllama_ds.config_loader import load_config
    from stackllama_ds.data.prompts import load_prompts
    from stackllama_ds.engines.generate import sample
    from stackllama_ds.models.forward import policy_forward
    from stackllama_ds.models.load import load_tokenizer
    from stackllama_ds.models.padding import cut_at_eos, pad
    from stackllama_ds.stages.ppo_steps import build_engines, rollout_forwards

    ns = argparse.Namespace(model="smollm2", steps=2, response_len=a.response_len, zero=a.zero, dtype=dtype,
                            micro_batch=None)
    cfg = load_config(stage_bench.our_config(ns, "ppo", "profile"), check_files=False)
    p, tok = cfg.ppo, load_tokenizer(stage_bench.model_dir(SMOL))
    prompts = load_prompts(cfg.root() / "data", tok, "rl_train", cfg.ppo.max_prompt_length)
    e = build_engines(cfg, tok, 100)
    actor = e.actor
    q_ids, q_mask = pad(prompts.ids[: p.batch_size], tok.pad_token_id, "left")
    P = q_ids.shape[1]
    state: dict = {}

    def generate() -> dict[str, float]:
        t0 = time.perf_counter()
        resp = sample(actor.module.policy, q_ids, q_mask, a.response_len)
        state["ids"] = torch.cat([q_ids, resp], 1)
        state["mask"] = torch.cat([q_mask, cut_at_eos(resp, tok.eos_token_id)], 1)
        return {"generate": time.perf_counter() - t0}

    def logprobs() -> dict[str, float]:
        t0 = time.perf_counter()
        state["fw"] = rollout_forwards(e, state["ids"], state["mask"], P, p)
        return {"log-probs": time.perf_counter() - t0}

    g = torch.Generator().manual_seed(0)

    def update() -> dict[str, float]:
        rows = slice(0, p.mini_batch_size)
        ids, mask, fw = state["ids"][rows], state["mask"][rows], state["fw"]
        tokens = mask[:, P:].float()
        adv = torch.randn(tokens.shape, generator=g)
        t0 = time.perf_counter()
        lp, values, _ = policy_forward(actor, ids, mask, P)
        pg, _ = rl.policy_loss(lp, fw.logprobs[rows], adv, tokens, p.cliprange)
        vf, _ = rl.value_loss(values, fw.values[rows], fw.values[rows] + adv, tokens, p.cliprange_value)
        t1 = time.perf_counter()
        actor.backward(pg + p.vf_coef * vf)
        t2 = time.perf_counter()
        actor.step()
        t3 = time.perf_counter()
        return {"update forward": t1 - t0, "update backward": t2 - t1, "update step": t3 - t2}

    res = {**timed(generate, a.steps), **timed(logprobs, a.steps), **timed(update, a.steps)}
    updates = p.ppo_epochs * p.batch_size // p.mini_batch_size
    upd = res["update forward"] + res["update backward"] + res["update step"]
    rows = [["s", *res.values(), upd * updates]]
    print(h.table(["", *res, f"train = {updates} updates"], rows,
                  f"LoRA PPO phases ({dtype}, ours ZeRO-{a.zero}, batch {p.batch_size}, prompts padded to "
                  f"{P}, {a.response_len} new tokens, mini batch {p.mini_batch_size}; load average "
                  f"{h.load_avg()})"))
    if a.torch_profile:
        top_ops("ours, generation of the batch", generate)
        top_ops("ours, rollout log-probs (actor + reference, values)", logprobs)
        top_ops("ours, one minibatch update", update)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["sft", "rm", "ppo"], default="sft")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--response-len", type=int, default=36)
    ap.add_argument("--seq", type=int, default=200, help="RM: tokens per answer row")
    ap.add_argument("--torch-profile", action="store_true")
    a = ap.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29563", DS_ACCELERATOR="cpu")
    import torch

    from stackllama_ds.engines import dist

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    dist.init("gloo", 120)
    from stackllama_ds.hardware import auto_dtype

    dtype = auto_dtype()
    print(f"# {h.machine()}; SmolLM2-135M-Instruct, LoRA as configs/smollm2.yaml, {dtype}, "
          f"{torch.get_num_threads()} threads")
    profile_ppo(a, dtype) if a.stage == "ppo" else profile_sft_rm(a, dtype, a.stage)


if __name__ == "__main__":
    main()
