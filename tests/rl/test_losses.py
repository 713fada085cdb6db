"""policy_loss / value_loss: hand-computed clipping cases and loops on random tensors."""

import math

import pytest
import torch

from stackllama_ds.rl import masked_mean, policy_loss, value_loss


def test_policy_loss_hand_computed_clipping():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 9.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # last token masked
    old = torch.zeros(1, 5)
    logprobs = torch.log(ratios).requires_grad_()
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+1 r=1.5: max(-1.5, -1.2) = -1.2  clipped
    #   A=+1 r=0.5: max(-0.5, -0.8) = -0.5
    #   A=-1 r=0.5: max( 0.5,  0.8) =  0.8  clipped
    #   A=-1 r=1.5: max( 1.5,  1.2) =  1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    log_r = [math.log(r) for r in (1.5, 0.5, 0.5, 1.5)]
    assert stats["approx_kl"].item() == pytest.approx(0.5 * sum(d * d for d in log_r) / 4)
    assert stats["policy_kl"].item() == pytest.approx(-sum(log_r) / 4)
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # Clipped tokens and the masked token get no gradient; the others get -A * r / n.
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0])


def test_policy_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    lp, old, adv = (torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2, 0, 4])[:, None]).float()
    loss, stats = policy_loss(lp, old, adv, mask, clip_range=0.1)
    terms, clipped = [], []
    for b in range(4):
        for t in range(6):
            if mask[b, t]:
                r = math.exp(lp[b, t].item() - old[b, t].item())
                a = adv[b, t].item()
                u, c = -a * r, -a * min(max(r, 0.9), 1.1)
                terms.append(max(u, c))
                clipped.append(float(c > u))
    assert loss.item() == pytest.approx(sum(terms) / len(terms))
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped))


def test_value_loss_hand_computed_clipping():
    values = torch.tensor([[1.0, 1.0, 0.1, 7.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    returns = torch.tensor([[0.0, 2.0, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # v=1 R=0:   (v-R)^2 = 1,    v_clip = 0.2 -> 0.04  : unclipped used
    # v=1 R=2:   (v-R)^2 = 1,    v_clip = 0.2 -> 3.24  : clipped used
    # v=.1 R=.3: (v-R)^2 = 0.04, v_clip = 0.1 -> 0.04  : equal, not counted as clipped
    assert loss.item() == pytest.approx(0.5 * (1 + 3.24 + 0.04) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["value_error"].item() == pytest.approx((1 + 1 + 0.04) / 3)
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # The clipped token gets no gradient (v_clip is constant there); the masked one neither.
    assert values.grad[0].tolist() == pytest.approx([1.0 / 3, 0.0, -0.2 / 3, 0.0])


def test_losses_all_masked_are_zero_and_finite():
    lp = torch.randn(2, 3, requires_grad=True)
    v = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    p_loss, p_stats = policy_loss(lp, torch.randn(2, 3), torch.randn(2, 3), mask, 0.2)
    v_loss, v_stats = value_loss(v, torch.randn(2, 3), torch.randn(2, 3), mask, 0.2)
    (p_loss + v_loss).backward()
    assert p_loss.item() == 0.0 and v_loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros(2, 3)) and torch.equal(v.grad, torch.zeros(2, 3))
    assert not any(s.isnan() for s in [*p_stats.values(), *v_stats.values()])


def test_losses_denom_passthrough():
    g = torch.Generator().manual_seed(1)
    lp, old, adv = (torch.randn(3, 4, generator=g) for _ in range(3))
    mask = torch.ones(3, 4)
    loss, _ = policy_loss(lp, old, adv, mask, 0.2, denom=24.0)
    full, _ = policy_loss(lp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(full.item() / 2)
    v_loss, _ = value_loss(lp, old, adv, mask, 0.2, denom=6.0)
    v_full, _ = value_loss(lp, old, adv, mask, 0.2)
    assert v_loss.item() == pytest.approx(v_full.item() * 2)
    assert masked_mean(adv, mask, denom=6.0).item() == pytest.approx(adv.sum().item() / 6)
