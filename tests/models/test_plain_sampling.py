"""Plain sampling stays plain with a real checkpoint: a model's generation_config.json must not leak
into rollouts (transformers 5 fills unset GenerationConfig fields from it)."""

from __future__ import annotations

import json

import pytest
import torch

from stackllama_ds.engines.generate import sample
from stackllama_ds.models.padding import pad, position_ids_from_mask

VOCAB, PAD = 64, 0


@pytest.fixture(scope="module")
def opinionated_model(tmp_path_factory):
    """A tiny Llama whose generation_config.json asks for everything plain sampling must ignore."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("opinionated")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(d)
    gen = {"do_sample": True, "temperature": 0.3, "top_k": 3, "top_p": 0.5, "repetition_penalty": 1.8,
           "no_repeat_ngram_size": 2, "min_new_tokens": 20, "min_length": 30, "eos_token_id": list(range(1, VOCAB // 2)),
           "pad_token_id": PAD, "suppress_tokens": [5, 6, 7]}
    (d / "generation_config.json").write_text(json.dumps(gen))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert model.generation_config.repetition_penalty == 1.8  # the file was read
    return model.eval()


def raw_softmax_sampling(model, ids, mask, new_tokens):
    """Reference: each token drawn from softmax(logits) of a full forward (no cache), by the inverse
    CDF of one uniform per row (float64), the draw ``sample`` makes."""
    out = []
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        cdf = torch.softmax(logits[:, -1].double(), -1).cumsum(-1)
        u = torch.rand(len(ids), 1, dtype=torch.float64) * cdf[:, -1:]
        nxt = (cdf <= u).sum(-1, keepdim=True)  # the first token whose cdf exceeds u
        out.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1)


def test_sampling_ignores_the_models_generation_config(opinionated_model):
    ids, mask = pad([[3, 9, 12, 4], [8, 2], [40, 41, 42]], PAD, "left")
    new = 24
    torch.manual_seed(123)
    got = sample(opinionated_model, ids, mask, new)
    torch.manual_seed(123)
    want = raw_softmax_sampling(opinionated_model, ids, mask, new)
    assert got.shape == (3, new)  # a leaked eos_token_id would have stopped early
    assert torch.equal(got, want)
    # the leaked settings would forbid these: repeated bigrams and the suppressed tokens 5, 6, 7
    # are allowed under plain sampling, and the model's own config is left as it was
    assert opinionated_model.generation_config.top_k == 3


def test_top_k_leak_would_be_visible(opinionated_model):
    """The check above can fail: with the model's config merged in, the samples differ."""
    ids, mask = pad([[3, 9, 12, 4], [8, 2], [40, 41, 42]], PAD, "left")
    torch.manual_seed(123)
    leaked = opinionated_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24)
    torch.manual_seed(123)
    want = raw_softmax_sampling(opinionated_model, ids, mask, 24)
    assert leaked.shape[1] - ids.shape[1] != 24 or not torch.equal(leaked[:, ids.shape[1]:], want)


def test_draw_follows_the_softmax():
    """draw(): frequencies of 200k draws match softmax(logits); a -inf logit is never drawn."""
    from stackllama_ds.engines.generate import draw

    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = p.log().expand(200_000, 5)  # log 0 = -inf
    torch.manual_seed(0)
    freq = torch.bincount(draw(logits), minlength=5).double() / 200_000
    assert freq[4] == 0
    # 4 standard errors of a binomial share at n = 200k: < 0.0045
    assert (freq - p.double()).abs().max().item() < 0.0045
