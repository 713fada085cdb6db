"""KL penalty, per-token rewards and KL controllers against loops and hand-computed values."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stackllama_ds.rl import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    per_token_rewards,
)


def rollout(seed=0, B=5, T=7, V=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ref_logits = logits + 0.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lp = torch.gather(F.log_softmax(logits, -1), -1, tokens[..., None]).squeeze(-1)
    ref = torch.gather(F.log_softmax(ref_logits, -1), -1, tokens[..., None]).squeeze(-1)
    lengths = [T, 3, 0, 1, 5][:B]  # full, early end, all-masked, single token, early end
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    return lp, ref, logits, ref_logits, mask, scores


@pytest.mark.parametrize(
    "kind, fn",
    [
        ("kl", lambda a, b: a - b),
        ("abs", lambda a, b: abs(a - b)),
        ("mse", lambda a, b: 0.5 * (a - b) ** 2),
    ],
)
def test_kl_penalty_sampled_kinds(kind, fn):
    lp, ref, *_ = rollout()
    out = kl_penalty(lp, ref, kind)
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            assert out[b, t].item() == pytest.approx(fn(lp[b, t].item(), ref[b, t].item()))


def test_kl_penalty_full_matches_loop():
    lp, ref, logits, ref_logits, *_ = rollout(seed=1)
    out = kl_penalty(lp, ref, "full", logits=logits, ref_logits=ref_logits)
    p_all, q_all = F.softmax(logits, -1), F.softmax(ref_logits, -1)
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            p, q = p_all[b, t].tolist(), q_all[b, t].tolist()
            expected = sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, q))
            assert out[b, t].item() == pytest.approx(expected)
    assert (out >= -1e-12).all()
    same = kl_penalty(lp, lp, "full", logits=logits, ref_logits=logits)
    assert torch.allclose(same, torch.zeros_like(same))
    bf16 = kl_penalty(lp, ref, "full", logits=logits.bfloat16(), ref_logits=ref_logits.bfloat16())
    assert bf16.dtype == torch.float32


def test_kl_penalty_errors():
    lp, ref, logits, *_ = rollout()
    with pytest.raises(ValueError, match="full"):
        kl_penalty(lp, ref, "full")
    with pytest.raises(ValueError, match="full"):
        kl_penalty(lp, ref, "full", logits=logits, ref_logits=logits[:, :-1])
    with pytest.raises(ValueError, match="unknown"):
        kl_penalty(lp, ref, "reverse")


def rewards_loop(scores, lp, ref, mask, beta):
    B, T = lp.shape
    rewards, kl_rewards = torch.zeros(B, T, dtype=lp.dtype), torch.zeros(B, T, dtype=lp.dtype)
    for b in range(B):
        last = None
        for t in range(T):
            if mask[b, t]:
                kl_rewards[b, t] = -beta * (lp[b, t] - ref[b, t])
                rewards[b, t] = kl_rewards[b, t]
                last = t
        if last is not None:
            rewards[b, last] += scores[b]
    return rewards, kl_rewards


def test_per_token_rewards_matches_loop():
    lp, ref, _, _, mask, scores = rollout(seed=2)
    rewards, kl_rewards = per_token_rewards(scores, lp, ref, mask, kl_coef=0.2)
    exp_rewards, exp_kl = rewards_loop(scores, lp, ref, mask, 0.2)
    assert torch.allclose(rewards, exp_rewards)
    assert torch.allclose(kl_rewards, exp_kl)
    assert torch.equal(rewards[2], torch.zeros_like(rewards[2]))  # all-masked row: no score
    assert not rewards.isnan().any()
    # The score sits on the last unmasked token of each non-empty row.
    assert rewards.sum().item() == pytest.approx(kl_rewards.sum().item() + scores[[0, 1, 3, 4]].sum().item())


def test_per_token_rewards_full_kl_and_tensor_coef():
    lp, ref, logits, ref_logits, mask, scores = rollout(seed=3)
    beta = torch.tensor(0.05, dtype=torch.float64)
    rewards, kl_rewards = per_token_rewards(
        scores, lp, ref, mask, beta, kind="full", logits=logits, ref_logits=ref_logits
    )
    full = kl_penalty(lp, ref, "full", logits=logits, ref_logits=ref_logits)
    assert torch.allclose(kl_rewards, -0.05 * full * mask)
    assert (kl_rewards <= 0).all()


def test_adaptive_kl_controller_hand_computed():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)  # 12/6 - 1 = 1 -> clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=100)  # -1 -> clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 100 / 10000))
    before = ctl.value
    ctl.update(current_kl=6.6, n_steps=64)  # 0.1, inside the clip range
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 64 / 10000))


def test_adaptive_kl_controller_matches_trl_formula():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    value = 0.2
    for kl in (0.5, 3.0, 6.0, 7.0, 40.0, -1.0):
        ctl.update(kl, 512)
        value *= 1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * 512 / 10000  # trl AdaptiveKLController.update
        assert ctl.value == pytest.approx(value)


def test_kl_controllers_state_dict():
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 1000)
    restored = AdaptiveKLController(0.1, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 10000)
