"""Masked reductions and whitening against plain-Python loops; empty masks give 0, never NaN."""

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stackllama_ds.rl import (
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    moments_to_mean_var,
)


def prefix_mask(lengths, T):
    """(B, T) float mask with row i set on its first lengths[i] positions (responses ending early)."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def batch(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    lengths[1] = 0  # an all-masked row
    lengths[2] = T  # a full row
    return x, prefix_mask(lengths, T)


def selected(x, mask):
    return [float(v) for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


def test_masked_sum_and_mean_match_loop():
    x, mask = batch()
    vals = selected(x, mask)
    assert masked_sum(x, mask).item() == pytest.approx(sum(vals))
    assert masked_mean(x, mask).item() == pytest.approx(sum(vals) / len(vals))
    row_means = masked_mean(x, mask, dim=1)
    for i in range(x.shape[0]):
        row = selected(x[i], mask[i])
        expected = sum(row) / len(row) if row else 0.0
        assert row_means[i].item() == pytest.approx(expected)
    assert row_means[1].item() == 0.0


def test_masked_mean_all_masked_is_zero_with_finite_grad():
    x = torch.full((3, 4), float("nan"), dtype=torch.float64).requires_grad_()
    mask = torch.zeros(3, 4)
    out = masked_mean(x, mask)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(masked_mean(x.detach(), mask, dim=1), torch.zeros(3, dtype=torch.float64))
    assert masked_mean(x.detach(), mask, denom=0).item() == 0.0


def test_masked_values_never_leak():
    x, mask = batch()
    garbage = x.masked_fill(mask == 0, float("nan"))
    assert torch.allclose(masked_mean(garbage, mask), masked_mean(x, mask))
    assert torch.allclose(masked_var(garbage, mask), masked_var(x, mask))
    out = masked_whiten(garbage, mask)
    assert not out.isnan().any()
    assert torch.allclose(masked_mean(x, mask.bool()), masked_mean(x, mask))


def test_masked_mean_denom():
    x, mask = batch()
    assert masked_mean(x, mask, denom=7.0).item() == pytest.approx(sum(selected(x, mask)) / 7.0)
    assert masked_mean(x, mask, denom=torch.tensor(7.0)).item() == pytest.approx(sum(selected(x, mask)) / 7.0)


def test_masked_mean_denom_gives_global_token_mean_over_two_ranks():
    # Two "ranks" with very different token counts. DeepSpeed averages gradients over ranks, so
    # each rank must divide by N_global / world_size to reproduce the gradient of the global mean.
    x, mask = batch(seed=3, B=8, T=10)
    mask[:4, 3:] = 0  # rank 0 holds short responses
    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    global_loss = masked_mean(x * w, mask)
    (grad_global,) = torch.autograd.grad(global_loss, w)

    world = 2
    n_global = mask.sum()  # all-reduced token count
    grads = []
    for xs, ms in ((x[:4], mask[:4]), (x[4:], mask[4:])):
        loss = masked_mean(xs * w, ms, denom=n_global / world)
        grads.append(torch.autograd.grad(loss, w)[0])
    assert torch.allclose(sum(grads) / world, grad_global)
    # Plain per-rank means weight the ranks equally instead, which is wrong here.
    naive = sum(
        torch.autograd.grad(masked_mean(xs * w, ms), w)[0]
        for xs, ms in ((x[:4], mask[:4]), (x[4:], mask[4:]))
    )
    assert not torch.allclose(naive / world, grad_global)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop(unbiased):
    x, mask = batch(seed=1)
    vals = selected(x, mask)
    expected = statistics.variance(vals) if unbiased else statistics.pvariance(vals)
    assert masked_var(x, mask, unbiased=unbiased).item() == pytest.approx(expected)


def test_masked_var_degenerate_counts():
    x = torch.randn(2, 3)
    one = torch.zeros(2, 3)
    one[0, 0] = 1
    assert masked_var(x, one).item() == 0.0
    assert masked_var(x, torch.zeros(2, 3)).item() == 0.0


def test_moments_match_local_and_sharded_statistics():
    x, mask = batch(seed=2, B=8)
    mean, var = moments_to_mean_var(*masked_moments(x, mask))
    assert mean.item() == pytest.approx(masked_mean(x, mask).item())
    assert var.item() == pytest.approx(masked_var(x, mask).item())
    # All-reduce = elementwise sum of the shards' moments.
    shards = [masked_moments(x[:3], mask[:3]), masked_moments(x[3:], mask[3:])]
    summed = [a + b for a, b in zip(*shards)]
    mean2, var2 = moments_to_mean_var(*summed)
    assert mean2.item() == pytest.approx(mean.item())
    assert var2.item() == pytest.approx(var.item())
    _, pvar = moments_to_mean_var(*summed, unbiased=False)
    assert pvar.item() == pytest.approx(masked_var(x, mask, unbiased=False).item())
    assert [t.item() for t in moments_to_mean_var(0.0, 0.0, 0.0)] == [0.0, 0.0]
    assert moments_to_mean_var(2.0, 4.0, 1.0)[1].item() == 0.0


def whiten_loop(x, mask, shift_mean=True):
    vals = selected(x, mask)
    mean, var = statistics.fmean(vals), statistics.variance(vals)  # unbiased
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[i, t]:
                y = (x[i, t].item() - mean) / (var + 1e-8) ** 0.5
                out[i, t] = y + (0.0 if shift_mean else mean)
    return out


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(shift_mean):
    x, mask = batch(seed=4)
    x = x * 3 + 5
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    assert torch.allclose(out, whiten_loop(x, mask, shift_mean))
    assert torch.equal(out[mask == 0], torch.zeros_like(out[mask == 0]))
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-6)  # unbiased variance 1
    expected_mean = masked_mean(x, mask).item() if not shift_mean else 0.0
    assert masked_mean(out, mask).item() == pytest.approx(expected_mean, abs=1e-9)


def test_masked_whiten_matches_trl_on_full_mask():
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = torch.ones_like(x)
    # trl/core.py: masked_whiten with the unbiased masked_var.
    mean = (x * mask).sum() / mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
    trl = (x - mean) * torch.rsqrt(var + 1e-8)
    assert torch.allclose(masked_whiten(x, mask), trl)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), trl + mean)


def test_masked_whiten_with_global_statistics_equals_whole_batch():
    x, mask = batch(seed=6, B=8)
    whole = masked_whiten(x, mask)
    moments = [a + b for a, b in zip(masked_moments(x[:5], mask[:5]), masked_moments(x[5:], mask[5:]))]
    mean, var = moments_to_mean_var(*moments)
    parts = torch.cat(
        [
            masked_whiten(x[:5], mask[:5], mean=mean, var=var),
            masked_whiten(x[5:], mask[5:], mean=mean, var=var),
        ]
    )
    assert torch.allclose(parts, whole)
    # Local statistics of one shard differ from the global ones.
    assert not torch.allclose(masked_whiten(x[:5], mask[:5]), whole[:5])
    f32 = masked_whiten(x.float(), mask, mean=mean, var=var)
    assert f32.dtype == torch.float32


def test_masked_whiten_edge_cases():
    with pytest.raises(ValueError):
        masked_whiten(torch.randn(2, 3), torch.ones(2, 3), mean=0.0)
    out = masked_whiten(torch.randn(2, 3), torch.zeros(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))
    one = torch.zeros(2, 3)
    one[1, 2] = 1
    assert not masked_whiten(torch.randn(2, 3), one).isnan().any()


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    keep=st.floats(0.0, 1.0),
)
def test_masked_ops_never_nan(rows, cols, seed, keep):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    mask = (torch.rand(rows, cols, generator=g) < keep).float()
    for out in (
        masked_mean(x, mask),
        masked_mean(x, mask, dim=1),
        masked_var(x, mask),
        masked_whiten(x, mask),
        *moments_to_mean_var(*masked_moments(x, mask)),
    ):
        assert not out.isnan().any()
    if mask.sum() == 0:
        assert masked_mean(x, mask).item() == 0.0
