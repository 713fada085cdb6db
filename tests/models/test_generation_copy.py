"""The ZeRO-3 generation copy is built empty (``empty_causal_lm``) and filled by name from the actor:
it must have the actor's parameters, name for name, tied heads included (SmolLM2 ties its head to
the embeddings), and give the actor's logits once refreshed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stackllama_ds.config import LoraConfig, ModelConfig
from stackllama_ds.engines.generate import GenerationCopy
from stackllama_ds.models.load import ActorWithValueHead, empty_causal_lm, load_causal_lm


def _save(tmp_path, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_copy_has_the_actors_parameters_and_logits(tmp_path, tied, lora):
    folder, m = _save(tmp_path, tied), ModelConfig()
    lc = LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0)
    actor = ActorWithValueHead(load_causal_lm(folder, m, dtype="fp32", lora=lc))
    with torch.no_grad():  # adapters away from their zero init, so a missed copy would show
        for n, p in actor.policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    copy = empty_causal_lm(folder, m, dtype="fp32", device=torch.device("cpu"), lora=lc)
    assert [n for n, _ in copy.named_parameters()] == [n for n, _ in actor.policy.named_parameters()]
    if tied:
        assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    policy = GenerationCopy(copy).refresh(SimpleNamespace(module=actor))
    ids = torch.arange(1, 17).view(2, 8)
    with torch.no_grad():
        want = actor.policy(input_ids=ids).logits
        assert torch.equal(policy(input_ids=ids).logits, want)


def test_refresh_refuses_a_structure_mismatch(tmp_path):
    m = ModelConfig()
    actor = ActorWithValueHead(load_causal_lm(_save(tmp_path / "a", tied=True), m, dtype="fp32"))
    untied = empty_causal_lm(_save(tmp_path / "b", tied=False), m, dtype="fp32", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        GenerationCopy(untied).refresh(SimpleNamespace(module=actor))
