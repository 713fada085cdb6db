"""PPO against the reward model: StackLLaMA's RL step as one loop on DeepSpeed engines.

    stackllama-ds ppo configs/tiny.yaml
    torchrun --nproc_per_node 2 -m stackllama_ds.cli ppo configs/tiny.yaml

Engines: actor (policy + value head, trained on policy_loss + vf_coef * value_loss), optional
critic, reference (frozen SFT policy; with LoRA the actor's base with the adapter disabled) and
reward (frozen reward model). One step: rollout -> score -> KL-penalised rewards -> GAE and
whitening over all ranks -> PPO epochs of minibatch updates -> KL-coefficient update -> log ->
checkpoint. Semantics follow classic TRL PPOTrainer (the StackLLaMA run).
"""

from __future__ import annotations

import time

import torch

from stackllama_ds import rl
from stackllama_ds.config import RunConfig
from stackllama_ds.data.prompts import load_prompts
from stackllama_ds.engines import dist
from stackllama_ds.models.load import load_tokenizer
from stackllama_ds.run import testhooks
from stackllama_ds.run.entry import check_finite
from stackllama_ds.run.layout import RunLayout
from stackllama_ds.run.stage import StageRun, checkpoint_meta
from stackllama_ds.stages.ppo_steps import (
    LoopState,
    build_engines,
    describe,
    log_samples,
    negative_kl_error,
    ppo_epochs,
    rollout_forwards,
    sample_rollout,
    score_rollout,
    step_row,
    step_sums,
    whiten_over_ranks,
)


def train(cfg: RunConfig) -> None:
    ppo = cfg.ppo
    run = StageRun(cfg, "ppo")
    rank, world = run.rank, run.world
    tok = load_tokenizer(RunLayout(cfg).sft_model)
    prompts = load_prompts(RunLayout(cfg).data, tok, "rl_train", ppo.max_prompt_length)
    updates_per_step = ppo.ppo_epochs * ppo.batch_size // (ppo.mini_batch_size * ppo.gradient_accumulation_steps)
    engines = build_engines(cfg, tok, ppo.steps * updates_per_step)
    loop = LoopState(ppo)
    meta = checkpoint_meta("actor", RunLayout(cfg).sft_model, cfg, ppo.lora, ppo.actor.dtype)
    state = run.resume(engines.trained(), meta, extra=loop)
    log = run.logger(ppo.steps, bar_keys=("reward_mean", "kl", "kl_coef"), log_every=ppo.log_every)
    run.text(describe(ppo, prompts, world, engines))
    t_start = time.time() - state.elapsed_s

    while state.step < ppo.steps:
        # step 1. rollout: this rank's prompts, plain sampling to a length drawn per rollout
        t0, secs = time.time(), {}  # secs: each phase's wall time, in loop order
        run.beat("actor generation")
        smp = sample_rollout(cfg, engines, tok, prompts, state.step, state.samples, rank, world)
        secs["t_generate"] = time.time() - t0

        # step 2. score: reward engine (or a rule) on question + response
        t0 = time.time()
        run.beat("reward forward")
        sc = score_rollout(ppo, engines.reward, tok, prompts, smp, state.step + 1, loop.moments)
        secs["t_score"] = time.time() - t0

        # step 3. log-probs under actor and reference, values; KL-penalised per-token rewards
        t0 = time.time()
        run.beat("reference forward")
        fw = rollout_forwards(engines, smp.ids, smp.mask, smp.prompt_len, ppo)
        resp_tokens = smp.r_mask.float()
        # rewards_t = -kl_coef * KL_t, plus the score at each response's last real token
        rewards, _ = rl.rewards_from_kl(dist.place(sc.scores), fw.kl, resp_tokens, loop.kl_ctl.value)
        secs["t_logprobs"] = time.time() - t0

        # step 4. GAE, then whiten advantages with mean/var over every rank's response tokens
        advantages, returns = rl.gae(fw.values, rewards, resp_tokens, ppo.gamma, ppo.lam)
        advantages = whiten_over_ranks(advantages, resp_tokens)
        roll = rl.Rollout(smp.q_ids, smp.q_mask, smp.resp, smp.r_mask, fw.logprobs, fw.ref_logprobs, fw.values,
                          dist.place(sc.scores), rewards, advantages, returns)

        # step 5. PPO epochs over shuffled minibatches; early stop on policy KL (all ranks agree)
        t0 = time.time()
        run.beat("critic/actor training")
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step * world + rank)
        updates, early = ppo_epochs(engines, roll, ppo, gen, state.step + 1, rank, world)
        secs["t_train"] = time.time() - t0

        # step 6. statistics over all ranks (one all-reduce), then the adaptive KL coefficient
        tot = step_sums(fw, sc, returns, advantages, resp_tokens, updates)
        kl_mean, kl_coef_used = loop.update_kl(tot)
        state.step += 1
        state.samples += ppo.batch_size * world
        state.tokens += int(tot["tokens"])
        testhooks.dump("ppo", state.step, mask=resp_tokens, entropy=fw.entropy, returns=returns,
                       advantages=advantages, updates=updates)

        # step 7. log (samples come from the rollout every rank computed: no rank-0-only forward)
        check_finite(state.step, reward_mean=tot["score"] / tot["sequences"], kl=kl_mean)
        row = step_row(tot, state.step, kl_coef_used, early, secs, time.time() - t_start)
        loop.neg_kl_streak = loop.neg_kl_streak + 1 if kl_mean < ppo.negative_kl_bound else 0
        row["negative_kl_flag"] = loop.neg_kl_streak > 0
        log.log(row)
        if ppo.log_samples and state.step % ppo.log_samples_every == 0:
            log_samples(run, sc, smp, state.step, ppo.log_samples)
        if loop.neg_kl_streak >= ppo.negative_kl_patience:
            raise negative_kl_error(ppo.negative_kl_bound, loop.neg_kl_streak, state.step, kl_mean)
        state.elapsed_s = time.time() - t_start

        # step 8. checkpoint every save_every, at the end, and on a stop signal (then exit 75)
        run.end_step(save=state.step % ppo.save_every == 0 or state.step == ppo.steps)

    # step 9. export the policy as a HF causal-LM folder (LoRA merged; value head beside it)
    del engines  # the export reads the checkpoint: free the engines' memory for it
    run.finish(run.dir / "model")
