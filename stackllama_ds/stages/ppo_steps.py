"""The pieces the PPO loop (``stages/ppo.py``) calls: engines, scores, the rollout's forwards, statistics."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from stackllama_ds import rl
from stackllama_ds.config import PPOConfig, RunConfig
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_eval_engine, build_train_engine
from stackllama_ds.engines.generate import GenerationCopy
from stackllama_ds.models.forward import critic_values, fp32_compute, policy_forward, response_logprobs
from stackllama_ds.models.hf_folder import load_value_head
from stackllama_ds.models.load import (
    ActorWithValueHead,
    TokenValueModel,
    empty_causal_lm,
    load_causal_lm,
    load_reward_model,
    trainable_dtype,
    zero3_init,
)
from stackllama_ds.run.layout import RunLayout

# Per-token means of each minibatch update, pooled over updates and ranks weighted by response tokens.
TOKEN_STATS = ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "policy_kl")


class Engines(NamedTuple):
    actor: Any  # ActorWithValueHead engine (values unused with a separate critic)
    critic: Any | None  # TokenValueModel engine, with ppo.separate_critic
    ref: Any | None  # frozen SFT policy; None with LoRA: the actor with its adapter disabled
    reward: Any | None  # frozen reward model; None with a rule reward
    gen_copy: GenerationCopy | None  # plain copy of a ZeRO-3 actor's policy to sample from

    def trained(self) -> dict[str, Any]:
        """The engines a checkpoint holds."""
        return {"actor": self.actor} | ({"critic": self.critic} if self.critic is not None else {})


def build_engines(cfg: RunConfig, tok, n_updates: int) -> Engines:
    """Each model loaded once per rank: trainable ones in ``trainable_dtype``, frozen ones in their
    engine's dtype, ZeRO-3 ones already partitioned (``zero3_init``)."""
    p, sft, m = cfg.ppo, RunLayout(cfg).sft_model, cfg.model
    gen_copy = None
    if p.actor.zero_stage == 3 and p.gather_generation:  # whole by design; filled from the actor
        template = (empty_causal_lm(sft, m, dtype=p.actor.dtype, device=dist.device(), lora=p.lora)
                    if m.quantization == "none" else load_causal_lm(sft, m, dtype=p.actor.dtype, lora=p.lora))
        gen_copy = GenerationCopy(template)
    with zero3_init(p.actor, m):
        actor_mod = ActorWithValueHead(load_causal_lm(sft, m, dtype=trainable_dtype(p.actor), lora=p.lora))
    load_value_head(actor_mod, sft)
    if p.separate_critic:
        actor_mod.v_head.requires_grad_(False)  # the critic engine owns the values
    actor = build_train_engine(actor_mod, p.actor, p.optim, total_steps=n_updates,
                               grad_accum=p.gradient_accumulation_steps)
    critic = None
    if p.separate_critic:
        src = RunLayout(cfg).rm_model if p.critic_init_from == "reward" else sft
        with zero3_init(p.critic, m):
            vm = TokenValueModel(load_reward_model(src, m, pad_token_id=tok.pad_token_id,
                                                   dtype=trainable_dtype(p.critic)))
        critic = build_train_engine(vm, p.critic, p.critic_optim, total_steps=n_updates,
                                    grad_accum=p.gradient_accumulation_steps)
    ref = None
    if not p.lora.enabled:
        with zero3_init(p.reference, m):
            ref = load_causal_lm(sft, m, dtype=p.reference.dtype, trainable=False)
        ref = build_eval_engine(ref, p.reference)
    reward = None
    if p.rule_reward is None:
        with zero3_init(p.reward, m):
            rm = load_reward_model(RunLayout(cfg).rm_model, m, pad_token_id=tok.pad_token_id, dtype=p.reward.dtype)
        reward = build_eval_engine(rm, p.reward)
    return Engines(actor, critic, ref, reward, gen_copy)


class LoopState:
    """What PPO carries from step to step beside TrainState; saved in every checkpoint."""

    def __init__(self, p: PPOConfig):
        self.kl_ctl = (rl.AdaptiveKLController(p.init_kl_coef, p.target, p.horizon) if p.adaptive_kl
                       else rl.FixedKLController(p.init_kl_coef))
        self.moments = rl.RunningMoments()  # of the scores, for reward_normalize
        self.neg_kl_streak = 0  # consecutive steps with mean KL below negative_kl_bound

    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict(), "moments": self.moments.state_dict(),
                "neg_kl_streak": self.neg_kl_streak}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(d["kl_ctl"])
        self.moments.load_state_dict(d["moments"])
        self.neg_kl_streak = d.get("neg_kl_streak", 0)


def rule_scores(resp: torch.Tensor, rmask: torch.Tensor, token_id: int, scale: float) -> torch.Tensor:
    """Reward rule for tests: share of response tokens equal to ``token_id`` (times ``scale``)."""
    return scale * rl.masked_mean((resp == token_id).float(), rmask.float(), dim=1)


def process_scores(raw: torch.Tensor, p: PPOConfig, moments: rl.RunningMoments, degenerate: torch.Tensor) -> torch.Tensor:
    """score = raw - baseline (- degenerate penalty), then optional running normalisation and clip."""
    s = raw - p.reward_baseline - p.degenerate_penalty * degenerate
    if p.reward_normalize:
        tot = dist.reduce_sums({"sum": s.sum(), "sum_sq": (s * s).sum(), "n": s.numel()})
        moments.update(tot["sum"], tot["sum_sq"], tot["n"])
        s = (s - moments.mean) / max(moments.std, 1e-6)
    if p.reward_clip is not None:
        s = s.clamp(-p.reward_clip, p.reward_clip)
    return s


class RolloutForwards(NamedTuple):
    logprobs: torch.Tensor  # (B, T) under the actor at rollout time
    values: torch.Tensor  # (B, T) of the value head, or of the critic
    ref_logprobs: torch.Tensor  # (B, T) under the reference
    kl: torch.Tensor  # (B, T) per-token KL estimate of ppo.kl_penalty
    entropy: torch.Tensor  # (B, T) of the actor's distribution


@torch.no_grad()
def rollout_forwards(e: Engines, ids: torch.Tensor, mask: torch.Tensor, P: int, p: PPOConfig) -> RolloutForwards:
    """Actor, reference and critic forwards over the rollout, ``ppo.forward_batch_size`` rows at a time;
    in fp32 arithmetic with ``ppo.rollout_fp32`` (``models.forward.Fp32Compute``: why)."""
    e.actor.eval()
    chunks: list[RolloutForwards] = []
    with fp32_compute(p.rollout_fp32):
        for s in range(0, ids.shape[0], p.forward_batch_size):
            rows = slice(s, s + p.forward_batch_size)
            lp, values, logits = policy_forward(e.actor.module, ids[rows], mask[rows], P)
            if e.ref is None:
                ref_lp, _, ref_logits = policy_forward(e.actor.module, ids[rows], mask[rows], P, disable_adapter=True)
            else:
                ref_lp, ref_logits = response_logprobs(e.ref, ids[rows], mask[rows], P)
            if e.critic is not None:
                values = critic_values(e.critic, ids[rows], mask[rows], P)
            # "full" needs both distributions, hence per chunk rather than from the log-probs at the end.
            kl = rl.kl_penalty(lp, ref_lp, p.kl_penalty, logits=logits, ref_logits=ref_logits)
            chunks.append(RolloutForwards(lp, values, ref_lp, kl, rl.entropy_from_logits(logits)))
    e.actor.train()
    return RolloutForwards(*(torch.cat(parts) for parts in zip(*chunks)))


def whiten_over_ranks(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whiten advantages with the mean and variance of every rank's response tokens."""
    s1, s2, n = rl.masked_moments(advantages, mask)
    tot = dist.reduce_sums({"s1": s1, "s2": s2, "n": n})
    mean, var = rl.moments_to_mean_var(tot["s1"], tot["s2"], tot["n"])
    return rl.masked_whiten(advantages, mask, mean=mean.to(advantages.device), var=var.to(advantages.device))


def update_stats(pg: torch.Tensor, vf: torch.Tensor, pst: dict, vst: dict, tokens: float, skipped: bool) -> dict:
    """One minibatch update's figures: its per-token means (TOKEN_STATS), response tokens, skipped."""
    means = {"policy_loss": pg, "value_loss": vf, "clipfrac": pst["clipfrac"], "vf_clipfrac": vst["clipfrac"],
             "approx_kl": pst["approx_kl"], "policy_kl": pst["policy_kl"]}
    # detach: pg and vf are the losses just backpropagated (float() of a grad tensor warns)
    return {**{k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in means.items()},
            "tokens": tokens, "skipped": float(skipped)}


def update_sums(updates: list[dict]) -> dict[str, float]:
    """This rank's updates as sums to pool over ranks: token-weighted TOKEN_STATS, skips, counts."""
    sums = {k: sum(u[k] * u["tokens"] for u in updates) for k in TOKEN_STATS}
    return {**sums, "update_tokens": sum(u["tokens"] for u in updates),
            "skipped": sum(u["skipped"] for u in updates), "updates": float(len(updates))}
