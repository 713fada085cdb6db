"""PPO prompt selection: the per-pass shuffle is computed once per pass, in the same order as the
original code that re-shuffled the whole prompt list for every prompt."""

from __future__ import annotations

import random

import pytest

from stackllama_ds.data import prompts as ppo


def prompt_batch_reference(n: int, start: int, batch: int, rank: int, world: int, seed: int) -> list[int]:
    """The original implementation: O(n) per prompt."""
    out = []
    for g in range(start + rank * batch, start + (rank + 1) * batch):
        epoch, i = divmod(g, n)
        order = list(range(n))
        random.Random(f"{seed}-prompts-{epoch}").shuffle(order)
        out.append(order[i])
    return out


@pytest.mark.parametrize("n", [1, 3, 7, 64, 1000])
@pytest.mark.parametrize("batch,world", [(1, 1), (4, 2), (8, 3), (5, 8)])
@pytest.mark.parametrize("seed", [0, 17])
def test_same_order_as_reference(n, batch, world, seed):
    ppo.prompt_order.cache_clear()
    for start in (0, 1, n - 1, n, 3 * n + 2, batch * world * 5):  # pass boundaries, several passes
        for rank in range(world):
            assert ppo.prompt_batch(n, start, batch, rank, world, seed) == prompt_batch_reference(
                n, start, batch, rank, world, seed), (n, start, batch, rank, world, seed)


def test_whole_run_one_shuffle_per_pass(monkeypatch):
    """A run's every step on every rank, as the PPO loop calls it: one shuffle per pass, not per prompt."""
    ppo.prompt_order.cache_clear()
    shuffles = []
    real = random.Random

    class Counting(real):
        def shuffle(self, x):
            shuffles.append(len(x))
            super().shuffle(x)

    monkeypatch.setattr(ppo.random, "Random", Counting)
    n, batch, world, steps = 50, 4, 3, 30  # 30 x 12 = 360 prompts: passes 0..7
    samples = 0
    for _ in range(steps):
        for rank in range(world):
            ppo.prompt_batch(n, samples, batch, rank, world, seed=0)
        samples += batch * world
    passes = (samples - 1) // n + 1
    assert shuffles == [n] * passes  # 8 shuffles for 360 prompts
    monkeypatch.undo()
    ppo.prompt_order.cache_clear()
    assert ppo.prompt_batch(n, 100, batch, 1, world, 0) == prompt_batch_reference(n, 100, batch, 1, world, 0)
