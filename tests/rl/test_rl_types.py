"""Rollout: shape checks, minibatch selection, device moves."""

import dataclasses

import pytest
import torch

from stackllama_ds.rl import Rollout


def make_rollout(B=4, P=3, T=5):
    per_token = {
        name: torch.arange(B * T, dtype=torch.float32).reshape(B, T) + k
        for k, name in enumerate(("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"))
    }
    return Rollout(
        query_ids=torch.arange(B * P).reshape(B, P),
        query_mask=torch.ones(B, P, dtype=torch.long),
        response_ids=torch.arange(B * T).reshape(B, T),
        response_mask=torch.ones(B, T),
        scores=torch.arange(B, dtype=torch.float32),
        **per_token,
    )


def test_index_select_returns_minibatch():
    rollout = make_rollout()
    mini = rollout.index_select(torch.tensor([3, 1]))
    assert len(mini) == 2
    for field in dataclasses.fields(Rollout):
        full, part = getattr(rollout, field.name), getattr(mini, field.name)
        assert torch.equal(part, full[[3, 1]])
    assert torch.equal(rollout.index_select([0]).scores, torch.tensor([0.0]))
    assert rollout.to("cpu").values.device.type == "cpu"


def test_rollout_is_frozen_and_checks_shapes():
    rollout = make_rollout()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rollout.values = torch.zeros(1)
    with pytest.raises(ValueError, match="batch size"):
        dataclasses.replace(rollout, scores=torch.zeros(3))
    with pytest.raises(ValueError, match="per-token"):
        dataclasses.replace(rollout, values=torch.zeros(4, 6))
