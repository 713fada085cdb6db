"""gae against a plain-Python loop, against TRL's compute_advantages, and by hand."""

import pytest
import torch

from stackllama_ds.rl import gae


def gae_loop(values, rewards, mask, gamma, lam):
    """Per row: walk back from the last unmasked token; the value after it is 0."""
    B, T = values.shape
    adv, ret = torch.zeros(B, T, dtype=values.dtype), torch.zeros(B, T, dtype=values.dtype)
    for b in range(B):
        n = int(mask[b].sum().item())  # left-aligned: tokens 0 .. n-1 are real
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(n)):
            v, r = values[b, t].item(), rewards[b, t].item()
            delta = r + gamma * next_v - v
            a = delta + gamma * lam * next_a
            adv[b, t], ret[b, t] = a, a + v
            next_v, next_a = v, a
    return adv, ret


def trl_compute_advantages(values, rewards, mask, gamma, lam):
    """trl 0.11 PPOTrainer.compute_advantages, without the final whitening."""
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    return advantages, returns


def data(seed, B=6, T=10, full=False):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [T] * B if full else [T, 0, 1, 4, 7, T][:B]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    return values, rewards, mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gae_matches_loop_with_early_ends(gamma, lam, seed):
    values, rewards, mask = data(seed)
    adv, ret = gae(values, rewards, mask, gamma, lam)
    exp_adv, exp_ret = gae_loop(values, rewards, mask, gamma, lam)
    assert torch.allclose(adv, exp_adv)
    assert torch.allclose(ret, exp_ret)
    assert torch.equal(adv[1], torch.zeros_like(adv[1]))  # all-masked row
    assert not adv.isnan().any() and not ret.isnan().any()
    assert torch.equal(adv * (1 - mask), torch.zeros_like(adv))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9)])
def test_gae_matches_trl_on_full_masks(gamma, lam):
    values, rewards, mask = data(seed=2, full=True)
    adv, ret = gae(values, rewards, mask, gamma, lam)
    trl_adv, trl_ret = trl_compute_advantages(values, rewards, mask, gamma, lam)
    assert torch.allclose(adv, trl_adv)
    assert torch.allclose(ret, trl_ret)


def test_gae_does_not_bootstrap_from_padding():
    values = torch.tensor([[1.0, 2.0, 100.0, 100.0]])
    rewards = torch.tensor([[0.0, 1.0, 50.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=1.0)
    # gamma = lam = 1: A_t = (sum of real rewards from t on) - V_t; R_t = sum of real rewards from t on.
    assert adv.tolist() == [[0.0, -1.0, 0.0, 0.0]]
    assert ret.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_gae_hand_computed():
    values = torch.tensor([[0.5, 0.25]])
    rewards = torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2)
    adv, _ = gae(values, rewards, mask, gamma=0.5, lam=0.5)
    a1 = 1.0 - 0.25  # delta_1 = r_1 + 0 - V_1
    a0 = (0.0 + 0.5 * 0.25 - 0.5) + 0.25 * a1  # delta_0 + gamma lam A_1
    assert adv[0].tolist() == pytest.approx([a0, a1])


def test_gae_empty_sequence():
    adv, ret = gae(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0), 1.0, 0.95)
    assert adv.shape == ret.shape == (2, 0)
