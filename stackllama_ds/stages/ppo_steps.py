"""The pieces the PPO loop (``stages/ppo.py``) calls: engines, rollout, scores, the rollout's forwards,
minibatch updates, statistics."""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import torch

from stackllama_ds import rl
from stackllama_ds.config import PPOConfig, RunConfig
from stackllama_ds.data.prompts import Prompts, prompt_batch
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_eval_engine, build_train_engine
from stackllama_ds.engines.generate import GenerationCopy, sample
from stackllama_ds.engines.load import trainable_dtype, zero3_init
from stackllama_ds.models.forward import critic_values, fp32_compute, policy_forward, response_logprobs
from stackllama_ds.models.hf_folder import load_value_head
from stackllama_ds.models.load import (
    ActorWithValueHead,
    TokenValueModel,
    empty_causal_lm,
    load_causal_lm,
    load_reward_model,
)
from stackllama_ds.models.padding import cut_at_eos, pad
from stackllama_ds.models.scoring import reward_scores
from stackllama_ds.run import testhooks
from stackllama_ds.run.errors import TrainingError
from stackllama_ds.run.layout import RunLayout
from stackllama_ds.run.stage import StageRun

# Per-token means of each minibatch update, pooled over updates and ranks weighted by response tokens.
TOKEN_STATS = ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "policy_kl")
NEG_KL_CAUSES = (
    "forced or suppressed tokens during generation (min_length, eos suppression, bad_words), "
    "padding or tokens after EOS counted in the KL, or a sampling setting other than plain sampling"
)


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

    def update_kl(self, tot: dict[str, float]) -> tuple[float, float]:
        """Feed the step's mean sequence KL (``step_sums``' figures) to the KL controller.

        Returns (mean KL, the coefficient the step's rewards were penalised with)."""
        kl_mean = tot["seq_kl"] / tot["sequences"]
        used = self.kl_ctl.value
        self.kl_ctl.update(kl_mean, int(tot["sequences"]))
        return kl_mean, used


def describe(p: PPOConfig, prompts: Prompts, world: int, e: Engines) -> str:
    """The run's opening log line: prompts kept, batch shape, reference and critic."""
    return (f"ppo: {len(prompts.questions)} prompts ({prompts.counts['n_question_cut']} with the question cut "
            f"to fit {p.max_prompt_length} tokens, {prompts.counts['n_too_long']} left out), world {world}, batch {p.batch_size}/rank, minibatch "
            f"{p.mini_batch_size} x accum {p.gradient_accumulation_steps}, {p.ppo_epochs} epochs, "
            f"reference={'adapter disabled' if e.ref is None else 'engine'}, "
            f"critic={'engine' if e.critic else 'value head'}")


class Sampled(NamedTuple):
    """This rank's rollout before scoring: B prompts left-padded to P tokens, T sampled tokens."""

    idx: list[int]  # (B,) prompt indices (prompt_batch)
    q_ids: torch.Tensor  # (B, P) prompt token ids
    q_mask: torch.Tensor  # (B, P)
    resp: torch.Tensor  # (B, T) sampled response tokens
    r_mask: torch.Tensor  # (B, T) 0 after the first EOS
    ids: torch.Tensor  # (B, P + T) prompt and response
    mask: torch.Tensor  # (B, P + T)
    texts: list[str]  # (B,) responses decoded up to the first EOS

    @property
    def prompt_len(self) -> int:
        """P: where the responses start in ``ids``."""
        return self.q_ids.shape[1]


def sample_rollout(cfg: RunConfig, e: Engines, tok, prompts: Prompts, step: int, samples: int, rank: int,
                   world: int) -> Sampled:
    """Sample this rank's prompts of step ``step`` (0-based) to a length drawn per rollout, alike on all ranks."""
    p, pad_id = cfg.ppo, tok.pad_token_id
    idx = prompt_batch(len(prompts.ids), samples, p.batch_size, rank, world, cfg.seed)
    q_ids, q_mask = (dist.place(t) for t in pad([prompts.ids[i] for i in idx], pad_id, "left"))
    new_tokens = random.Random(f"{cfg.seed}-len-{step}").randint(p.response_min_length, p.response_max_length)
    # ZeRO-3 without a copy: every rank runs the same new_tokens forwards, each all-gathering.
    policy = e.actor.module.policy if e.gen_copy is None else e.gen_copy.refresh(e.actor)
    resp = sample(policy, q_ids, q_mask, new_tokens)
    r_mask = cut_at_eos(resp, tok.eos_token_id)  # (B, T); tokens after the first EOS are masked everywhere
    ids, mask = torch.cat([q_ids, resp], 1), torch.cat([q_mask, r_mask], 1)
    texts = tok.batch_decode(resp.masked_fill(r_mask == 0, pad_id), skip_special_tokens=True)
    return Sampled(idx, q_ids, q_mask, resp, r_mask, ids, mask, texts)


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


class Scored(NamedTuple):
    """The rollout's scores before the KL penalty, each (B,)."""

    questions: list[str]  # the prompts' questions
    degenerate: torch.Tensor  # 1.0 where rl.is_degenerate(response)
    raw: torch.Tensor  # the reward model's (or rule's) score
    scores: torch.Tensor  # process_scores(raw): what the last response token's reward adds


def score_rollout(p: PPOConfig, reward, tok, prompts: Prompts, smp: Sampled, step: int,
                  moments: rl.RunningMoments) -> Scored:
    """Reward engine (or ``p.rule_reward``) on question + response of step ``step`` (1-based).

    A non-finite score on any rank stops every rank (TrainingError) before it reaches the rewards."""
    questions = [prompts.questions[i] for i in smp.idx]
    degenerate = torch.tensor([float(rl.is_degenerate(t)) for t in smp.texts])
    if p.rule_reward is not None:
        raw = rule_scores(smp.resp.cpu(), smp.r_mask.cpu(), p.rule_reward.token_id, p.rule_reward.scale)
    else:
        raw = reward_scores(reward, tok, questions, smp.texts, smp.q_ids.device)
    raw = testhooks.fault_value("reward", step, raw)
    if dist.any_rank(not bool(torch.isfinite(raw).all())):
        raise TrainingError(f"non-finite reward at step {step}; the last good checkpoint is kept")
    return Scored(questions, degenerate, raw, process_scores(raw, p, moments, degenerate))


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


def minibatch_update(e: Engines, mb: rl.Rollout, p: PPOConfig, P: int, step: int, rank: int) -> tuple[dict, bool]:
    """One minibatch: fresh forwards, clipped policy and value losses, backward and engine step(s).

    Returns its ``update_stats`` and whether the actor's step closed a gradient-accumulation window.
    Raises TrainingError (on every rank) when a loss of step ``step`` (1-based) is not finite."""
    actor, critic = e.actor, e.critic
    mb_ids = torch.cat([mb.query_ids, mb.response_ids], 1)
    mb_mask = torch.cat([mb.query_mask, mb.response_mask], 1)
    mb_tokens = mb.response_mask.float()
    logprobs, values, _ = policy_forward(actor, mb_ids, mb_mask, P)
    if critic is not None:
        values = critic_values(critic, mb_ids, mb_mask, P)
    pg, policy_stats = rl.policy_loss(logprobs, mb.logprobs, mb.advantages, mb_tokens, p.cliprange)
    vf, value_stats = rl.value_loss(values, mb.values, mb.returns, mb_tokens, p.cliprange_value)
    # NaN/inf on any rank stops every rank before the update; the last checkpoint stays good.
    if dist.any_rank(not (torch.isfinite(pg) and torch.isfinite(vf))):
        raise TrainingError(f"non-finite loss at step {step} (policy {pg.item()}, "
                            f"value {vf.item()} on rank {rank}); the last good checkpoint is kept")
    # A minibatch whose mean ratio explodes is skipped: zero loss keeps the collectives in step.
    skip = float(policy_stats["ratio_mean"]) > p.ratio_threshold
    scale = 0.0 if skip else 1.0
    if critic is None:
        actor.backward(scale * (pg + p.vf_coef * vf))
    else:
        actor.backward(scale * pg)
        critic.backward(scale * vf)
        critic.step()
    boundary = actor.is_gradient_accumulation_boundary()
    actor.step()
    return update_stats(pg, vf, policy_stats, value_stats, mb_tokens.sum().item(), skip), boundary


def ppo_epochs(e: Engines, roll: rl.Rollout, p: PPOConfig, gen: torch.Generator, step: int, rank: int,
               world: int) -> tuple[list[dict], bool]:
    """``p.ppo_epochs`` passes over shuffled minibatches of the rollout, early stop on policy KL.

    At each accumulation boundary (with ``p.early_stopping``) the mean policy KL of the window's
    updates, averaged over ranks, above 1.5 x target_kl stops every rank alike. Returns this rank's
    ``update_stats`` in order and whether the epochs stopped early."""
    updates: list[dict] = []
    window_kl: list[float] = []  # policy KL of the updates since the last accumulation boundary
    for _ in range(p.ppo_epochs):
        for mb_idx in torch.randperm(p.batch_size, generator=gen).split(p.mini_batch_size):
            stats, boundary = minibatch_update(e, roll.index_select(mb_idx), p, roll.query_ids.shape[1], step, rank)
            updates.append(stats)
            window_kl.append(stats["policy_kl"])
            if boundary and p.early_stopping:
                kl_now = dist.reduce_sums({"kl": sum(window_kl) / len(window_kl)})["kl"] / world
                window_kl = []
                if kl_now > 1.5 * p.target_kl:
                    return updates, True
    return updates, False


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


def step_sums(fw: RolloutForwards, sc: Scored, returns: torch.Tensor, advantages: torch.Tensor,
              resp_tokens: torch.Tensor, updates: list[dict]) -> dict[str, float]:
    """The step's figures summed over every rank in one all-reduce: rollout, scores and updates."""
    seq_kl = ((fw.logprobs - fw.ref_logprobs) * resp_tokens).sum(1)  # (B,)
    return dist.reduce_sums({
        **update_sums(updates), "seq_kl": seq_kl.sum(), "sequences": len(seq_kl), "score": sc.scores.sum(),
        "score_sq": (sc.scores ** 2).sum(), "raw": sc.raw.sum(), "tokens": resp_tokens.sum(),
        "degenerate": sc.degenerate.sum(), "entropy": rl.masked_sum(fw.entropy, resp_tokens),
        "returns": rl.masked_sum(returns, resp_tokens), "advantages": rl.masked_sum(advantages, resp_tokens),
    })


def step_row(tot: dict[str, float], step: int, kl_coef: float, early: bool, secs: dict[str, float],
             elapsed_s: float) -> dict[str, Any]:
    """The step's metrics row from ``step_sums``: means per sequence, per response token and per update.

    ``secs``: t_generate, t_score, t_logprobs, t_train in that order; ``kl_coef`` the one the step used."""
    n_seq, n_tok = tot["sequences"], tot["tokens"]
    reward_mean = tot["score"] / n_seq
    step_time = secs["t_generate"] + secs["t_score"] + secs["t_logprobs"] + secs["t_train"]
    return {
        "step": step, "reward_mean": reward_mean,
        "reward_std": max(tot["score_sq"] / n_seq - reward_mean ** 2, 0.0) ** 0.5,
        "score_mean": tot["raw"] / n_seq, "kl": tot["seq_kl"] / n_seq, "kl_coef": kl_coef,
        "entropy": tot["entropy"] / n_tok, **{k: tot[k] / tot["update_tokens"] for k in TOKEN_STATS},
        "skipped": tot["skipped"] / tot["updates"],
        "returns_mean": tot["returns"] / n_tok, "advantages_mean": tot["advantages"] / n_tok,
        "response_len": n_tok / n_seq, "tokens_per_s": n_tok / step_time,
        "degenerate_frac": tot["degenerate"] / n_seq, "early_stop": early,
        **secs, "elapsed_s": elapsed_s,
    }


def log_samples(run: StageRun, sc: Scored, smp: Sampled, step: int, n: int) -> None:
    """Log the first ``n`` of this rank's rollouts (rank 0 writes): reward, question and response, cut short."""
    for q, t, s in list(zip(sc.questions, smp.texts, sc.scores.tolist()))[:n]:
        run.text(f"[sample step {step}] reward {s:+.3f}\n  Q: {q[:200]!r}\n  A: {t[:300]!r}")


def negative_kl_error(bound: float, streak: int, step: int, kl_mean: float) -> TrainingError:
    """The error that stops a run whose mean KL stayed below ``bound`` for ``streak`` steps."""
    return TrainingError(
        f"mean KL below {bound} for {streak} steps (step {step}, "
        f"kl={kl_mean:.3f}); usual causes: {NEG_KL_CAUSES}"
    )
