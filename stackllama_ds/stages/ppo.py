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

import random
import time

import torch

from stackllama_ds import rl
from stackllama_ds.config import RunConfig
from stackllama_ds.data.prompts import load_prompts, prompt_batch
from stackllama_ds.engines import dist
from stackllama_ds.engines.generate import sample
from stackllama_ds.models.forward import critic_values, policy_forward
from stackllama_ds.models.load import load_tokenizer
from stackllama_ds.models.padding import cut_at_eos, pad
from stackllama_ds.models.scoring import reward_scores
from stackllama_ds.run import testhooks
from stackllama_ds.run.entry import check_finite
from stackllama_ds.run.errors import TrainingError
from stackllama_ds.run.layout import RunLayout
from stackllama_ds.run.stage import StageRun, checkpoint_meta
from stackllama_ds.stages.ppo_steps import (
    TOKEN_STATS,
    LoopState,
    build_engines,
    process_scores,
    rollout_forwards,
    rule_scores,
    update_stats,
    update_sums,
    whiten_over_ranks,
)

NEG_KL_CAUSES = (
    "forced or suppressed tokens during generation (min_length, eos suppression, bad_words), "
    "padding or tokens after EOS counted in the KL, or a sampling setting other than plain sampling"
)


def train(cfg: RunConfig) -> None:
    ppo = cfg.ppo
    run = StageRun(cfg, "ppo")
    rank, world = run.rank, run.world
    tok = load_tokenizer(RunLayout(cfg).sft_model)
    prompts = load_prompts(RunLayout(cfg).data, tok, "rl_train", ppo.max_prompt_length)
    updates_per_step = ppo.ppo_epochs * ppo.batch_size // (ppo.mini_batch_size * ppo.gradient_accumulation_steps)
    engines = build_engines(cfg, tok, ppo.steps * updates_per_step)
    actor, critic = engines.actor, engines.critic
    loop = LoopState(ppo)
    meta = checkpoint_meta("actor", RunLayout(cfg).sft_model, cfg, ppo.lora, ppo.actor.dtype)
    state = run.resume(engines.trained(), meta, extra=loop)
    log = run.logger(ppo.steps, bar_keys=("reward_mean", "kl", "kl_coef"), log_every=ppo.log_every)
    run.text(f"ppo: {len(prompts.questions)} prompts ({prompts.counts['n_question_cut']} with the question cut "
             f"to fit {ppo.max_prompt_length} tokens, {prompts.counts['n_too_long']} left out), world {world}, batch {ppo.batch_size}/rank, minibatch "
             f"{ppo.mini_batch_size} x accum {ppo.gradient_accumulation_steps}, {ppo.ppo_epochs} epochs, "
             f"reference={'adapter disabled' if engines.ref is None else 'engine'}, "
             f"critic={'engine' if critic else 'value head'}")
    eos, pad_id = tok.eos_token_id, tok.pad_token_id
    t_start = time.time() - state.elapsed_s

    while state.step < ppo.steps:
        # step 1. rollout: this rank's prompts, plain sampling to a length drawn per rollout
        t0 = time.time()
        run.beat("actor generation")
        idx = prompt_batch(len(prompts.ids), state.samples, ppo.batch_size, rank, world, cfg.seed)
        q_ids, q_mask = (dist.place(t) for t in pad([prompts.ids[i] for i in idx], pad_id, "left"))
        P = q_ids.shape[1]
        new_tokens = random.Random(f"{cfg.seed}-len-{state.step}").randint(ppo.response_min_length,
                                                                           ppo.response_max_length)
        # ZeRO-3 without a copy: every rank runs the same new_tokens forwards, each all-gathering.
        policy = actor.module.policy if engines.gen_copy is None else engines.gen_copy.refresh(actor)
        resp = sample(policy, q_ids, q_mask, new_tokens)
        r_mask = cut_at_eos(resp, eos)  # (B, T); tokens after the first EOS are masked everywhere
        ids, mask = torch.cat([q_ids, resp], 1), torch.cat([q_mask, r_mask], 1)
        texts = tok.batch_decode(resp.masked_fill(r_mask == 0, pad_id), skip_special_tokens=True)
        t_generate = time.time() - t0

        # step 2. score: reward engine (or a rule) on question + response
        t0 = time.time()
        run.beat("reward forward")
        questions = [prompts.questions[i] for i in idx]
        degenerate = torch.tensor([float(rl.is_degenerate(t)) for t in texts])
        if ppo.rule_reward is not None:
            raw = rule_scores(resp.cpu(), r_mask.cpu(), ppo.rule_reward.token_id, ppo.rule_reward.scale)
        else:
            raw = reward_scores(engines.reward, tok, questions, texts, q_ids.device)
        raw = testhooks.fault_value("reward", state.step + 1, raw)
        if dist.any_rank(not bool(torch.isfinite(raw).all())):
            raise TrainingError(f"non-finite reward at step {state.step + 1}; the last good checkpoint is kept")
        scores = process_scores(raw, ppo, loop.moments, degenerate)
        t_score = time.time() - t0

        # step 3. log-probs under actor and reference, values; KL-penalised per-token rewards
        t0 = time.time()
        run.beat("reference forward")
        fw = rollout_forwards(engines, ids, mask, P, ppo)
        resp_tokens = r_mask.float()
        # rewards_t = -kl_coef * KL_t, plus the score at each response's last real token
        rewards, _ = rl.rewards_from_kl(dist.place(scores), fw.kl, resp_tokens, loop.kl_ctl.value)
        t_logprobs = time.time() - t0

        # step 4. GAE, then whiten advantages with mean/var over every rank's response tokens
        advantages, returns = rl.gae(fw.values, rewards, resp_tokens, ppo.gamma, ppo.lam)
        advantages = whiten_over_ranks(advantages, resp_tokens)
        roll = rl.Rollout(q_ids, q_mask, resp, r_mask, fw.logprobs, fw.ref_logprobs, fw.values, dist.place(scores),
                          rewards, advantages, returns)

        # step 5. PPO epochs over shuffled minibatches; early stop on policy KL (all ranks agree)
        t0 = time.time()
        run.beat("critic/actor training")
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step * world + rank)
        updates: list[dict] = []  # update_stats of this rank's minibatch updates
        window_kl: list[float] = []  # policy KL of the updates since the last accumulation boundary
        early = False
        for _ in range(ppo.ppo_epochs):
            for mb_idx in torch.randperm(ppo.batch_size, generator=gen).split(ppo.mini_batch_size):
                mb = roll.index_select(mb_idx)
                mb_ids = torch.cat([mb.query_ids, mb.response_ids], 1)
                mb_mask = torch.cat([mb.query_mask, mb.response_mask], 1)
                mb_tokens = mb.response_mask.float()
                logprobs, values, _ = policy_forward(actor, mb_ids, mb_mask, P)
                if critic is not None:
                    values = critic_values(critic, mb_ids, mb_mask, P)
                pg, policy_stats = rl.policy_loss(logprobs, mb.logprobs, mb.advantages, mb_tokens, ppo.cliprange)
                vf, value_stats = rl.value_loss(values, mb.values, mb.returns, mb_tokens, ppo.cliprange_value)
                # NaN/inf on any rank stops every rank before the update; the last checkpoint stays good.
                if dist.any_rank(not (torch.isfinite(pg) and torch.isfinite(vf))):
                    raise TrainingError(f"non-finite loss at step {state.step + 1} (policy {pg.item()}, "
                                                f"value {vf.item()} on rank {rank}); the last good checkpoint is kept")
                # A minibatch whose mean ratio explodes is skipped: zero loss keeps the collectives in step.
                skip = float(policy_stats["ratio_mean"]) > ppo.ratio_threshold
                scale = 0.0 if skip else 1.0
                if critic is None:
                    actor.backward(scale * (pg + ppo.vf_coef * vf))
                else:
                    actor.backward(scale * pg)
                    critic.backward(scale * vf)
                    critic.step()
                boundary = actor.is_gradient_accumulation_boundary()
                actor.step()
                updates.append(update_stats(pg, vf, policy_stats, value_stats, mb_tokens.sum().item(), skip))
                window_kl.append(float(policy_stats["policy_kl"]))
                if boundary and ppo.early_stopping:
                    kl_now = dist.reduce_sums({"kl": sum(window_kl) / len(window_kl)})["kl"] / world
                    window_kl = []
                    if kl_now > 1.5 * ppo.target_kl:
                        early = True
                        break
            if early:
                break
        t_train = time.time() - t0

        # step 6. statistics over all ranks (one all-reduce), then the adaptive KL coefficient
        seq_kl = ((fw.logprobs - fw.ref_logprobs) * resp_tokens).sum(1)  # (B,)
        tot = dist.reduce_sums({
            **update_sums(updates), "seq_kl": seq_kl.sum(), "sequences": len(seq_kl), "score": scores.sum(),
            "score_sq": (scores ** 2).sum(), "raw": raw.sum(), "tokens": resp_tokens.sum(),
            "degenerate": degenerate.sum(), "entropy": rl.masked_sum(fw.entropy, resp_tokens),
            "returns": rl.masked_sum(returns, resp_tokens), "advantages": rl.masked_sum(advantages, resp_tokens),
        })
        n_seq, n_tok = tot["sequences"], tot["tokens"]
        kl_mean = tot["seq_kl"] / n_seq
        kl_coef_used = loop.kl_ctl.value
        loop.kl_ctl.update(kl_mean, int(n_seq))
        state.step += 1
        state.samples += ppo.batch_size * world
        state.tokens += int(n_tok)
        testhooks.dump("ppo", state.step, mask=resp_tokens, entropy=fw.entropy, returns=returns,
                       advantages=advantages, updates=updates)

        # step 7. log (samples come from the rollout every rank computed: no rank-0-only forward)
        reward_mean = tot["score"] / n_seq
        check_finite(state.step, reward_mean=reward_mean, kl=kl_mean)
        step_time = t_generate + t_score + t_logprobs + t_train
        row = {
            "step": state.step, "reward_mean": reward_mean,
            "reward_std": max(tot["score_sq"] / n_seq - reward_mean ** 2, 0.0) ** 0.5,
            "score_mean": tot["raw"] / n_seq, "kl": kl_mean, "kl_coef": kl_coef_used,
            "entropy": tot["entropy"] / n_tok, **{k: tot[k] / tot["update_tokens"] for k in TOKEN_STATS},
            "skipped": tot["skipped"] / tot["updates"],
            "returns_mean": tot["returns"] / n_tok, "advantages_mean": tot["advantages"] / n_tok,
            "response_len": n_tok / n_seq, "tokens_per_s": n_tok / step_time,
            "degenerate_frac": tot["degenerate"] / n_seq, "early_stop": early,
            "t_generate": t_generate, "t_score": t_score, "t_logprobs": t_logprobs, "t_train": t_train,
            "elapsed_s": time.time() - t_start,
        }
        loop.neg_kl_streak = loop.neg_kl_streak + 1 if kl_mean < ppo.negative_kl_bound else 0
        row["negative_kl_flag"] = loop.neg_kl_streak > 0
        log.log(row)
        if ppo.log_samples and state.step % ppo.log_samples_every == 0:
            for q, t, s in list(zip(questions, texts, scores.tolist()))[: ppo.log_samples]:
                run.text(f"[sample step {state.step}] reward {s:+.3f}\n  Q: {q[:200]!r}\n  A: {t[:300]!r}")
        if loop.neg_kl_streak >= ppo.negative_kl_patience:
            raise TrainingError(
                f"mean KL below {ppo.negative_kl_bound} for {loop.neg_kl_streak} steps (step {state.step}, "
                f"kl={kl_mean:.3f}); usual causes: {NEG_KL_CAUSES}"
            )
        state.elapsed_s = time.time() - t_start

        # step 8. checkpoint every save_every, at the end, and on a stop signal (then exit 75)
        run.end_step(save=state.step % ppo.save_every == 0 or state.step == ppo.steps)

    # step 9. export the policy as a HF causal-LM folder (LoRA merged; value head beside it)
    del engines, actor, critic  # the export reads the checkpoint: free the engines' memory for it
    run.finish(run.dir / "model")
