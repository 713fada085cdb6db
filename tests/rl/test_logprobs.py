"""logprobs_from_logits / entropy_from_logits against log_softmax loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from stackllama_ds.rl import entropy_from_logits, logprobs_from_logits


def logits_and_tokens(seed=0, B=3, T=5, V=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return logits, tokens


@pytest.mark.parametrize("chunk_rows", [1, 2, 8])
def test_logprobs_match_loop(chunk_rows):
    logits, tokens = logits_and_tokens()
    out = logprobs_from_logits(logits, tokens, chunk_rows=chunk_rows)
    assert out.shape == tokens.shape
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            row = logits[b, t].tolist()
            lse = math.log(sum(math.exp(v) for v in row))
            assert out[b, t].item() == pytest.approx(row[tokens[b, t]] - lse)


def test_logprobs_bf16_upcast_and_grad():
    logits, tokens = logits_and_tokens(seed=1, dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, tokens)
    assert out.dtype == torch.float32
    ref = torch.gather(F.log_softmax(logits.float(), -1), -1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(out, ref, atol=1e-5)

    leaf = logits_and_tokens(seed=2)[0].requires_grad_()
    logprobs_from_logits(leaf, tokens).sum().backward()
    leaf2 = leaf.detach().clone().requires_grad_()
    torch.gather(F.log_softmax(leaf2, -1), -1, tokens[..., None]).sum().backward()
    assert torch.allclose(leaf.grad, leaf2.grad)


def test_logprobs_empty_batch():
    assert logprobs_from_logits(torch.zeros(0, 4, 7), torch.zeros(0, 4, dtype=torch.long)).shape == (0, 4)


def test_entropy_matches_loop():
    logits, _ = logits_and_tokens(seed=3)
    out = entropy_from_logits(logits, chunk_rows=2)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            row = logits[b, t].tolist()
            z = sum(math.exp(v) for v in row)
            expected = -sum(math.exp(v) / z * math.log(math.exp(v) / z) for v in row)
            assert out[b, t].item() == pytest.approx(expected)


def test_entropy_uniform_and_masked_vocab():
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 3, 8)), torch.full((2, 3), math.log(8)))
    logits = torch.zeros(1, 1, 4)
    logits[..., 2:] = float("-inf")  # two tokens banned
    out = entropy_from_logits(logits)
    assert out.item() == pytest.approx(math.log(2))
