"""Generation with the LoRA adapter merged (engines.generate.merged_lora): same samples as the
unmerged policy, and the frozen base (the reference policy) given back bit for bit."""

from __future__ import annotations

import pytest
import torch

from stackllama_ds.engines.generate import merged_lora, sample
from stackllama_ds.models.padding import pad, position_ids_from_mask
from tests.models.test_plain_sampling import raw_softmax_sampling

VOCAB, PAD = 64, 0


def _lora_llama(dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=1)
    model = get_peft_model(LlamaForCausalLM(cfg).to(dtype),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero (a no-op adapter): make the merge change the weights
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_generation_restores_the_base_exactly(dtype):
    model = _lora_llama(dtype)
    ids, mask = pad([[3, 9, 12, 4], [8, 2], [40, 41, 42]], PAD, "left")
    before, logits_before = _base_weights(model), _logits(model, ids, mask)
    with model.disable_adapter():
        ref_before = _logits(model, ids, mask)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with merged_lora(model):
        assert q.merged  # the adapter is folded into the weight while generating
        assert not torch.equal(q.get_base_layer().weight, before["base_model.model.model.layers.0.self_attn.q_proj"
                                                                  ".base_layer.weight"])
        merged_logits = _logits(model, ids, mask)
    assert not q.merged
    after = _base_weights(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)  # bit for bit, bf16 included
    assert torch.equal(_logits(model, ids, mask), logits_before)
    tol = 1e-5 if dtype == torch.float32 else 0.1  # the same policy up to one rounding of W + BA
    assert (merged_logits.float() - logits_before.float()).abs().max().item() < tol
    with model.disable_adapter():  # the reference (adapter off) is untouched too
        assert torch.equal(_logits(model, ids, mask), ref_before)


def test_merged_sampling_draws_the_unmerged_policys_tokens():
    model = _lora_llama(torch.float32)
    ids, mask = pad([[3, 9, 12, 4], [8, 2], [40, 41, 42]], PAD, "left")
    new = 16
    torch.manual_seed(7)
    got = sample(model, ids, mask, new)  # merged inside
    torch.manual_seed(7)
    want = raw_softmax_sampling(model, ids, mask, new)  # full unmerged forwards, no cache
    assert torch.equal(got, want)
    assert not any(getattr(m, "merged", False) for m in model.modules())


@pytest.mark.parametrize("lora", [False, True])
def test_loaded_lm_head_gets_a_contiguous_input(tmp_path, lora):
    """load_causal_lm makes the head's input contiguous: a strided slice of the hidden states
    (logits_to_keep) against a frozen head otherwise runs as a bmm over a per-row copy of the weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stackllama_ds.config import LoraConfig, ModelConfig
    from stackllama_ds.models.load import load_causal_lm

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    lc = LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = load_causal_lm(tmp_path, ModelConfig(name_or_path=str(tmp_path)), dtype="fp32", lora=lc,
                           trainable=False).eval()
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(2, VOCAB, (3, 9))
    with torch.no_grad():
        kept = model(input_ids=ids, logits_to_keep=4).logits
        full = model(input_ids=ids).logits
    assert seen == [True, True]
    assert torch.allclose(kept, full[:, -4:], atol=1e-6)
