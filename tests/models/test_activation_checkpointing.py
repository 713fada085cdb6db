"""gradient_checkpointing reaches the PPO actor and critic: the value-head wrappers recompute their
decoder layers' activations (fewer bytes saved for the backward) and give the same losses and
gradients as without it, plain and with LoRA (dropout on, so the recompute must replay the RNG).

    python -m pytest tests/models/test_activation_checkpointing.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stackllama_ds.config import LoraConfig
from stackllama_ds.models.load import ActorWithValueHead, TokenValueModel, apply_lora

CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0)
LORA = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])


def _actor(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**CFG))
    return ActorWithValueHead(apply_lora(lm, LORA, "CAUSAL_LM", quantized=False) if lora else lm)


def _critic(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    sc = LlamaForSequenceClassification(LlamaConfig(**CFG, num_labels=1))
    return TokenValueModel(apply_lora(sc, LORA, "SEQ_CLS", quantized=False) if lora else sc)


def _loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(ids, mask, keep=8)
    if isinstance(out, tuple):  # actor: (logits (B, 8, V), values (B, 8))
        logits, values = out
        return logits.float().logsumexp(-1).mean() + values.square().mean()
    return out.square().mean()  # critic: values (B, 8)


def _run(model: torch.nn.Module, ids, mask) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, grads of trainable params, bytes of activations saved for the backward)."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t: torch.Tensor):
        nonlocal saved
        if t.data_ptr() not in params:  # weights saved by a matmul are not activation memory
            saved += t.numel() * t.element_size()
        return t

    model.train()
    torch.manual_seed(1)  # same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, ids, mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, saved


@pytest.mark.parametrize(
    "make,lora", [(_actor, False), (_actor, True), (_critic, False), (_critic, True)],
    ids=["actor", "actor-lora", "critic", "critic-lora"],
)
def test_checkpointing_saves_activations_and_keeps_grads(make, lora):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    plain = make(lora)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable()
    assert ckpt.config.use_cache is False
    layers = [m for m in ckpt.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing for m in layers if type(m).__name__.endswith("DecoderLayer"))

    loss0, grads0, bytes0 = _run(plain, ids, mask)
    loss1, grads1, bytes1 = _run(ckpt, ids, mask)
    assert bytes1 < 0.5 * bytes0, (bytes0, bytes1)
    assert loss1 == pytest.approx(loss0, abs=1e-5)
    assert grads1.keys() == grads0.keys() and grads0
    if lora:
        assert all("lora_" in n or "v_head" in n or "modules_to_save" in n for n in grads0)
    for n, g0 in grads0.items():
        torch.testing.assert_close(grads1[n], g0, rtol=1e-5, atol=1e-5, msg=n)
