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

import array
import contextlib
import functools
import random
import time

import torch

from stackllama_ds import rl, runtime
from stackllama_ds.checkpoint import StopSignal, save_checkpoint
from stackllama_ds.config import PPOConfig, RunConfig
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.data.template import format_prompt
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_eval_engine, build_train_engine
from stackllama_ds.engines.generate import GenerationCopy, sample
from stackllama_ds.heartbeat import Heartbeat
from stackllama_ds.metrics import MetricsLogger
from stackllama_ds.models.export import load_value_head
from stackllama_ds.models.load import (
    ActorWithValueHead,
    TokenValueModel,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
)
from stackllama_ds.models.rollout import (
    cut_at_eos,
    is_partitioned,
    left_pad,
    position_ids_from_mask,
    response_logprobs,
    reward_scores,
    trim_left_padding,
)

NEG_KL_CAUSES = (
    "forced or suppressed tokens during generation (min_length, eos suppression, bad_words), "
    "padding or tokens after EOS counted in the KL, or a sampling setting other than plain sampling"
)


# ----------------------------------------------------------------------------------- prompts
def load_prompts(cfg: RunConfig, tok) -> tuple[list[str], list[list[int]], int]:
    """Distinct questions of rl_train as (questions, prompt token ids); too-long prompts counted."""
    split = load_prepared(runtime.data_dir(cfg))["rl_train"]
    seen, questions = set(), []
    for row in split:
        key = (row["site"], row["qid"])
        if key not in seen:
            seen.add(key)
            questions.append(row["question"])
    ids = tok([format_prompt(q) for q in questions], add_special_tokens=True)["input_ids"]
    keep = [i for i, x in enumerate(ids) if len(x) <= cfg.ppo.max_prompt_length]
    if not keep:
        raise runtime.TrainingError(
            f"no rl_train prompt fits ppo.max_prompt_length={cfg.ppo.max_prompt_length} tokens "
            f"({len(ids)} prompts, shortest {min((len(x) for x in ids), default=0)} tokens)"
        )
    return [questions[i] for i in keep], [ids[i] for i in keep], len(ids) - len(keep)


@functools.lru_cache(maxsize=2)  # this pass and the next: a batch may straddle the boundary
def prompt_order(n: int, epoch: int, seed: int) -> array.array:
    """Pass ``epoch``'s shuffled order of the n prompts, the same on every rank; read-only (cached)."""
    order = list(range(n))
    random.Random(f"{seed}-prompts-{epoch}").shuffle(order)
    return array.array("q", order)  # 8 B per prompt, not a list of int objects


def prompt_batch(n: int, start: int, batch: int, rank: int, world: int, seed: int) -> list[int]:
    """This rank's prompt indices for the rollout that starts at global prompt ``start``.

    Global prompt g is ``prompt_order(n, g // n, seed)[g % n]``; the order is shuffled once per pass.
    """
    out = []
    for g in range(start + rank * batch, start + (rank + 1) * batch):
        epoch, i = divmod(g, n)
        out.append(prompt_order(n, epoch, seed)[i])
    return out


# ----------------------------------------------------------------------------------- forwards
def policy_forward(module, ids, mask, P: int, with_values: bool = True, disable_adapter: bool = False):
    """Log-probs, entropy and values of the response positions; module is ActorWithValueHead.

    Token t of the response (absolute position P+t) is predicted at position P+t-1; its value is
    the value of that same state (TRL's alignment). Leading all-padding columns are dropped and the
    heads run on the last T+1 positions only: same numbers, less work.
    """
    ids, mask, P = trim_left_padding(ids, mask, P)
    T = ids.shape[1] - P
    ctx = module.policy.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with ctx:
        logits, values = module(ids, mask, position_ids_from_mask(mask), keep=T + 1)  # (B, T+1, V), (B, T+1)
    logits = logits[:, :-1]  # (B, T, V)
    lp = rl.logprobs_from_logits(logits, ids[:, P:])
    return lp, values[:, :-1], logits


def critic_values(critic, ids, mask, P: int) -> torch.Tensor:
    """The separate critic's values (B, T) of the response states, aligned as in ``policy_forward``."""
    ids, mask, P = trim_left_padding(ids, mask, P)
    return critic(ids, mask, position_ids_from_mask(mask), keep=ids.shape[1] - P + 1)[:, :-1]


def rule_scores(resp: torch.Tensor, rmask: torch.Tensor, token_id: int, scale: float) -> torch.Tensor:
    """Reward rule for tests: share of response tokens equal to ``token_id`` (times ``scale``)."""
    return scale * rl.masked_mean((resp == token_id).float(), rmask.float(), dim=1)


# ------------------------------------------------------------------------------------ engines
def build_engines(cfg: RunConfig, tok, n_updates: int):
    """actor (+critic), reference (None in LoRA mode), reward (None with a rule reward), gen copy."""
    p = cfg.ppo
    sft = runtime.sft_model_path(cfg)
    policy = load_causal_lm(sft, cfg.model, dtype="fp32", lora=p.lora)
    actor_mod = ActorWithValueHead(policy)
    load_value_head(actor_mod, sft)
    if p.separate_critic:
        actor_mod.v_head.requires_grad_(False)  # the critic engine owns the values
    gen_copy = None
    if p.actor.zero_stage == 3 and p.gather_generation:
        gen_copy = GenerationCopy(load_causal_lm(sft, cfg.model, dtype=p.actor.dtype, lora=p.lora))
    actor = build_train_engine(actor_mod, p.actor, p.optim, total_steps=n_updates, grad_accum=p.gradient_accumulation_steps)
    critic = None
    if p.separate_critic:
        src = runtime.rm_model_path(cfg) if p.critic_init_from == "reward" else sft
        vm = TokenValueModel(load_reward_model(src, cfg.model, pad_token_id=tok.pad_token_id, dtype="fp32"))
        critic = build_train_engine(vm, p.critic, p.critic_optim, total_steps=n_updates,
                                    grad_accum=p.gradient_accumulation_steps)
    ref = None
    if not p.lora.enabled:
        ref = build_eval_engine(load_causal_lm(sft, cfg.model, dtype=p.reference.dtype, trainable=False), p.reference)
    reward = None
    if p.rule_reward is None:
        rm = load_reward_model(runtime.rm_model_path(cfg), cfg.model, pad_token_id=tok.pad_token_id, dtype=p.reward.dtype)
        reward = build_eval_engine(rm, p.reward)
    return actor, critic, ref, reward, gen_copy


def process_scores(raw: torch.Tensor, p: PPOConfig, moments: rl.RunningMoments, degenerate: torch.Tensor) -> torch.Tensor:
    """score = raw - baseline (- degenerate penalty), then optional running normalisation and clip."""
    s = raw - p.reward_baseline - p.degenerate_penalty * degenerate
    if p.reward_normalize:
        tot = dist.all_reduce_sum(torch.tensor([s.sum().item(), (s * s).sum().item(), float(s.numel())]))
        moments.update(tot[0], tot[1], tot[2])
        s = (s - moments.mean) / max(moments.std, 1e-6)
    if p.reward_clip is not None:
        s = s.clamp(-p.reward_clip, p.reward_clip)
    return s


# --------------------------------------------------------------------------------------- loop
def train(cfg: RunConfig) -> None:
    p = cfg.ppo
    stage_dir, ckpt_root = cfg.stage_dir("ppo"), cfg.stage_dir("ppo") / "checkpoints"
    stop = StopSignal()  # first: a signal during the slow setup must not kill the rank outright
    runtime.setup(cfg)
    rank, world = dist.rank(), dist.world_size()
    tok = load_tokenizer(runtime.sft_model_path(cfg))
    questions, prompt_ids, n_long = load_prompts(cfg, tok)
    updates_per_step = p.ppo_epochs * p.batch_size // (p.mini_batch_size * p.gradient_accumulation_steps)
    actor, critic, ref, reward, gen_copy = build_engines(cfg, tok, p.steps * updates_per_step)
    runtime.seed_ranks(cfg)
    dev = actor.device
    engines = {"actor": actor} | ({"critic": critic} if critic is not None else {})
    kl_ctl = rl.AdaptiveKLController(p.init_kl_coef, p.target, p.horizon) if p.adaptive_kl \
        else rl.FixedKLController(p.init_kl_coef)
    moments = rl.RunningMoments()
    state, client = runtime.resume(engines, ckpt_root)
    if client:
        kl_ctl.load_state_dict(client["kl_ctl"])
        moments.load_state_dict(client["moments"])
    neg_kl_streak = client.get("neg_kl_streak", 0) if client else 0
    log = MetricsLogger(stage_dir, "ppo", cfg.logging, p.steps, state.step, cfg.output_root, cfg.model_dump(),
                        bar_keys=("reward_mean", "kl", "kl_coef"))
    if rank == 0:
        log.text(f"ppo: {len(questions)} prompts ({n_long} longer than {p.max_prompt_length} tokens filtered), "
                 f"world {world}, batch {p.batch_size}/rank, minibatch {p.mini_batch_size} x accum "
                 f"{p.gradient_accumulation_steps}, {p.ppo_epochs} epochs, "
                 f"reference={'adapter disabled' if ref is None else 'engine'}, critic={'engine' if critic else 'value head'}")
    hb = Heartbeat(stage_dir, rank, world, cfg.launch.hang_timeout_s)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    t_start = time.time() - state.elapsed_s

    def checkpoint() -> None:
        client = {"kind": "actor", "base": str(runtime.sft_model_path(cfg)), "model": cfg.model.model_dump(),
                  "lora": p.lora.model_dump(), "dtype": p.actor.dtype, "kl_ctl": kl_ctl.state_dict(),
                  "moments": moments.state_dict(), "neg_kl_streak": neg_kl_streak}
        hb.beat("checkpoint save", state.step)
        save_checkpoint(engines, ckpt_root, state, cfg.checkpoint.keep_last, client)

    while state.step < p.steps:
        # step 1. rollout: this rank's prompts, plain sampling to a length drawn per batch
        t0 = time.time()
        hb.beat("actor generation", state.step + 1)
        idx = prompt_batch(len(questions), state.samples, p.batch_size, rank, world, cfg.seed)
        q_ids, q_mask = left_pad([prompt_ids[i] for i in idx], pad)
        q_ids, q_mask = q_ids.to(dev), q_mask.to(dev)
        P = q_ids.shape[1]
        new_tokens = random.Random(f"{cfg.seed}-len-{state.step}").randint(p.response_min_length, p.response_max_length)
        if gen_copy is not None:
            resp = sample(gen_copy.refresh(actor), q_ids, q_mask, new_tokens, pad)
        else:
            # ZeRO-3 without a copy: every rank must enter generate() or the all-gathers hang.
            resp = sample(actor.module.policy, q_ids, q_mask, new_tokens, pad, synced_gpus=is_partitioned(actor))
        r_mask = cut_at_eos(resp, eos)  # (B, T); tokens after the first EOS are masked everywhere
        ids = torch.cat([q_ids, resp], 1)
        mask = torch.cat([q_mask, r_mask], 1)
        texts = tok.batch_decode(resp.masked_fill(r_mask == 0, pad), skip_special_tokens=True)
        t_generate = time.time() - t0

        # step 2. score: reward engine (or a rule) on question + response
        t0 = time.time()
        hb.beat("reward forward", state.step + 1)
        batch_q = [questions[i] for i in idx]
        degenerate = torch.tensor([float(rl.is_degenerate(t)) for t in texts])
        if p.rule_reward is not None:
            raw = rule_scores(resp.cpu(), r_mask.cpu(), p.rule_reward.token_id, p.rule_reward.scale)
        else:
            raw = reward_scores(reward, tok, batch_q, texts, dev)
        raw = runtime.fault_value("reward", state.step + 1, raw)
        if dist.any_rank(not bool(torch.isfinite(raw).all())):
            raise runtime.TrainingError(f"non-finite reward at step {state.step + 1}; the last good checkpoint is kept")
        scores = process_scores(raw, p, moments, degenerate)
        t_score = time.time() - t0

        # step 3. log-probs under actor and reference, values; KL-penalised per-token rewards
        t0 = time.time()
        hb.beat("reference forward", state.step + 1)
        actor.eval()
        with torch.no_grad():
            lp_chunks, v_chunks, ref_chunks, ent_chunks, kl_chunks = [], [], [], [], []
            for s in range(0, p.batch_size, p.mini_batch_size):
                sl = slice(s, s + p.mini_batch_size)
                lp, v, logits = policy_forward(actor.module, ids[sl], mask[sl], P)
                ent_chunks.append(rl.entropy_from_logits(logits))
                lp_chunks.append(lp)
                v_chunks.append(v)
                if ref is None:
                    ref_lp, _, ref_logits = policy_forward(actor.module, ids[sl], mask[sl], P, disable_adapter=True)
                else:
                    ref_lp, ref_logits = response_logprobs(ref, ids[sl], mask[sl], P)
                ref_chunks.append(ref_lp)
                # Per-token KL estimate; "full" needs both distributions, so it is taken chunk by chunk.
                kl_chunks.append(rl.kl_penalty(lp, ref_lp, p.kl_penalty, logits=logits, ref_logits=ref_logits))
                if critic is not None:
                    v_chunks[-1] = critic_values(critic, ids[sl], mask[sl], P)
        actor.train()
        logprobs, values, ref_logprobs = torch.cat(lp_chunks), torch.cat(v_chunks), torch.cat(ref_chunks)
        m = r_mask.float()
        # rewards_t = -kl_coef * KL_t, plus the score at each response's last real token
        rewards, _ = rl.rewards_from_kl(scores.to(dev), torch.cat(kl_chunks), m, kl_ctl.value)
        t_logprobs = time.time() - t0

        # step 4. GAE, then whiten advantages with mean/var over every rank's response tokens
        advantages, returns = rl.gae(values, rewards, m, p.gamma, p.lam)
        s1, s2, n = rl.masked_moments(advantages, m)
        tot = dist.all_reduce_sum(torch.stack([s1, s2, n]).cpu())
        g_mean, g_var = rl.moments_to_mean_var(tot[0], tot[1], tot[2])
        advantages = rl.masked_whiten(advantages, m, mean=g_mean.to(dev), var=g_var.to(dev))
        roll = rl.Rollout(q_ids, q_mask, resp, r_mask, logprobs, ref_logprobs, values, scores.to(dev),
                          rewards, advantages, returns)

        # step 5. PPO epochs over shuffled minibatches; early stop on policy KL (all ranks agree)
        t0 = time.time()
        hb.beat("critic/actor training", state.step + 1)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step * world + rank)
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac",
                                                         "approx_kl", "policy_kl", "skipped")}
        window_kl: list[float] = []
        early = False
        for _ in range(p.ppo_epochs):
            for mb_idx in torch.randperm(p.batch_size, generator=gen).split(p.mini_batch_size):
                mb = roll.index_select(mb_idx)
                mb_ids = torch.cat([mb.query_ids, mb.response_ids], 1)
                mb_mask = torch.cat([mb.query_mask, mb.response_mask], 1)
                mm = mb.response_mask.float()
                lp, v, _ = policy_forward(actor, mb_ids, mb_mask, P)
                if critic is not None:
                    v = critic_values(critic, mb_ids, mb_mask, P)
                pg, pst = rl.policy_loss(lp, mb.logprobs, mb.advantages, mm, p.cliprange)
                vf, vst = rl.value_loss(v, mb.values, mb.returns, mm, p.cliprange_value)
                # A minibatch whose mean ratio explodes is skipped: zero loss keeps the collectives in step.
                # NaN/inf on any rank stops every rank before the update; the last checkpoint stays good.
                if dist.any_rank(not (torch.isfinite(pg) and torch.isfinite(vf))):
                    raise runtime.TrainingError(f"non-finite loss at step {state.step + 1} (policy {pg.item()}, "
                                                f"value {vf.item()} on rank {rank}); the last good checkpoint is kept")
                skip = float(pst["ratio_mean"]) > p.ratio_threshold
                scale = 0.0 if skip else 1.0
                if critic is None:
                    actor.backward(scale * (pg + p.vf_coef * vf))
                else:
                    actor.backward(scale * pg)
                    critic.backward(scale * vf)
                    critic.step()
                boundary = actor.is_gradient_accumulation_boundary()
                actor.step()
                for k, val in (("policy_loss", pg.item()), ("value_loss", vf.item()), ("clipfrac", pst["clipfrac"]),
                               ("vf_clipfrac", vst["clipfrac"]), ("approx_kl", pst["approx_kl"]),
                               ("policy_kl", pst["policy_kl"]), ("skipped", float(skip))):
                    stats[k].append(float(val))
                window_kl.append(float(pst["policy_kl"]))
                if boundary and p.early_stopping:
                    kl_now = dist.all_reduce_sum(torch.tensor([sum(window_kl) / len(window_kl)])).item() / world
                    window_kl = []
                    if kl_now > 1.5 * p.target_kl:
                        early = True
                        break
            if early:
                break
        t_train = time.time() - t0

        # step 6. adaptive KL coefficient from the sequence-level KL of this rollout (all ranks)
        seq_kl = ((logprobs - ref_logprobs) * m).sum(1)  # (B,)
        ent = rl.masked_mean(torch.cat(ent_chunks), m)
        red = dist.all_reduce_sum(torch.tensor([
            seq_kl.sum().item(), float(len(seq_kl)), scores.sum().item(), (scores ** 2).sum().item(),
            raw.sum().item(), m.sum().item(), degenerate.sum().item(), ent.item(),
            rl.masked_mean(returns, m).item(), rl.masked_mean(advantages, m).item(),
        ]))
        n_seq = red[1].item()
        kl_mean = red[0].item() / n_seq
        kl_coef_used = kl_ctl.value
        kl_ctl.update(kl_mean, int(n_seq))
        state.step += 1
        state.samples += p.batch_size * world
        state.tokens += int(red[5].item())

        # step 7. log (samples come from the rollout every rank computed: no rank-0-only forward)
        reward_mean = red[2].item() / n_seq
        runtime.check_finite(state.step, reward_mean=reward_mean, kl=kl_mean)
        step_time = t_generate + t_score + t_logprobs + t_train
        row = {
            "step": state.step, "reward_mean": reward_mean,
            "reward_std": max(red[3].item() / n_seq - reward_mean ** 2, 0.0) ** 0.5,
            "score_mean": red[4].item() / n_seq, "kl": kl_mean, "kl_coef": kl_coef_used,
            "entropy": red[7].item() / world, **{k: sum(v) / len(v) for k, v in stats.items() if v},
            "returns_mean": red[8].item() / world, "advantages_mean": red[9].item() / world,
            "response_len": red[5].item() / n_seq, "tokens_per_s": red[5].item() / step_time,
            "degenerate_frac": red[6].item() / n_seq, "early_stop": early,
            "t_generate": t_generate, "t_score": t_score, "t_logprobs": t_logprobs, "t_train": t_train,
            "elapsed_s": time.time() - t_start,
        }
        neg_kl_streak = neg_kl_streak + 1 if kl_mean < p.negative_kl_bound else 0
        row["negative_kl_flag"] = neg_kl_streak > 0
        log.log(row)
        if p.log_samples and state.step % p.log_samples_every == 0 and rank == 0:
            for q, t, s in list(zip(batch_q, texts, scores.tolist()))[: p.log_samples]:
                log.text(f"[sample step {state.step}] reward {s:+.3f}\n  Q: {q[:200]!r}\n  A: {t[:300]!r}")
        if neg_kl_streak >= p.negative_kl_patience:
            raise runtime.TrainingError(
                f"mean KL below {p.negative_kl_bound} for {neg_kl_streak} steps (step {state.step}, kl={kl_mean:.3f}); "
                f"usual causes: {NEG_KL_CAUSES}"
            )
        state.elapsed_s = time.time() - t_start

        # step 8. checkpoint every save_every, at the end, and on a stop signal (then exit 75)
        runtime.step_hook()
        stopping = stop.requested()
        if state.step % p.save_every == 0 or state.step == p.steps or stopping:
            checkpoint()
        if stopping:
            log.close()
            raise runtime.StopForResume(f"ppo checkpointed at step {state.step}")

    # step 9. export the policy as a HF causal-LM folder (LoRA merged; value head beside it)
    log.close()
    runtime.export_and_finish(ckpt_root, stage_dir / "model", stage_dir, state.step)
