"""RunningMoments merges batch moments into the statistics of the concatenated stream."""

import pytest
import torch

from stackllama_ds.rl import RunningMoments, masked_moments


def test_running_moments_match_concatenation():
    g = torch.Generator().manual_seed(0)
    rm = RunningMoments()
    assert rm.std == 1.0  # nothing seen yet
    seen = []
    for size in (1, 5, 17, 3, 64):
        x = torch.randn(size, generator=g, dtype=torch.float64) * 2 + 3
        seen.append(x)
        batch_mean, batch_std = rm.update(x.sum(), (x * x).sum(), size)
        assert batch_mean == pytest.approx(x.mean().item())
        assert batch_std == pytest.approx(x.std().item() if size > 1 else 0.0)
        everything = torch.cat(seen)
        assert rm.mean == pytest.approx(everything.mean().item())
        assert rm.count == everything.numel()
        if everything.numel() > 1:
            assert rm.std == pytest.approx(everything.std().item())  # unbiased


def test_running_moments_from_masked_moments_and_state_dict():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.ones(4, 6)
    mask[2:, 3:] = 0
    rm = RunningMoments()
    rm.update(*masked_moments(x, mask))
    assert rm.mean == pytest.approx(x[mask.bool()].mean().item())
    assert rm.std == pytest.approx(x[mask.bool()].std().item())
    assert rm.update(0.0, 0.0, 0) == (0.0, 0.0)  # empty batch is a no-op
    restored = RunningMoments()
    restored.load_state_dict(rm.state_dict())
    assert (restored.mean, restored.std, restored.count) == (rm.mean, rm.std, rm.count)
