"""Shared-prefix packed scoring equals the unshared padded forward: scores and parameter gradients.

    python -m pytest tests/models/test_packed_scores.py -q                 # tiny Llama, fp32, 1e-5
    python -m pytest tests/models/test_packed_scores.py -q -m slow         # SmolLM2-135M, bf16

The reference is the RM's padded path: ``collate_pairs`` (2B right-padded rows) -> one forward ->
the classifier's score at each row's last token. The loss is the ranking loss on the summed heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stackllama_ds.data.packed_pairs import pack_groups, pack_pairs
from stackllama_ds.data.pair_batches import collate_pairs
from stackllama_ds.models.packed import packed_head_scores, supports_packed


def _tiny(num_labels: int, attn: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from stackllama_ds.models.load import fp32_score

    torch.manual_seed(seed)
    return fp32_score(LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, num_labels=num_labels, attn_implementation=attn)))


def _random_pairs(seed: int = 1) -> list[tuple[list[int], list[int]]]:
    """Pairs sharing a random question; answers of unequal lengths, one starting like the other."""
    g = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(1, 64, (n,), generator=g).tolist()

    out = []
    for q, a, b in ((9, 4, 11), (14, 3, 1), (6, 7, 7), (1, 2, 5)):
        Q = toks(q)
        out.append((Q + toks(a), Q + toks(b)))
    out[2] = (out[2][0], out[2][0][:8] + toks(5))  # the answers share their first tokens too
    return out


def _lcp(a, b) -> int:
    """Common prefix by a plain loop, each sequence keeping its last token."""
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def _loss(r: torch.Tensor, B: int) -> torch.Tensor:
    total = r.sum(-1)  # (2B,) the summed heads, as rm_loss
    return -F.logsigmoid(total[:B] - total[B:]).mean()


def _padded_scores(model, pairs, pad_id: int = 0) -> torch.Tensor:
    batch = collate_pairs(pairs, pad_id)
    return model(input_ids=batch["input_ids"], use_cache=False).logits  # (2B, K)


def _scores_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    r = fn()
    _loss(r, r.shape[0] // 2).backward()
    return r.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("num_labels", "attn", "ckpt"), [(1, "sdpa", False), (2, "sdpa", False), (2, "eager", False),
                                                        (2, "sdpa", True)])
def test_packed_scores_and_grads_equal_padded_fp32(num_labels, attn, ckpt):
    """sdpa: attention span by span (``grouped_sdpa``); eager: the whole row's mask; ckpt: activation
    checkpointing recomputes each layer in the backward pass with the same spans."""
    from stackllama_ds.models.load import enable_activation_checkpointing

    model = _tiny(num_labels, attn)
    if ckpt:
        enable_activation_checkpointing(model)
    pairs = _random_pairs()
    row = pack_pairs(pairs)
    assert row.n_tokens == sum(len(c) + len(k) - _lcp(c, k) for c, k in pairs)  # padding-free, each prefix once
    assert supports_packed(model)
    r_packed, g_packed = _scores_and_grads(model, lambda: packed_head_scores(model, row, "cpu"))
    r_padded, g_padded = _scores_and_grads(model, lambda: _padded_scores(model, pairs))
    assert r_packed.shape == (2 * len(pairs), num_labels)
    torch.testing.assert_close(r_packed, r_padded, atol=1e-5, rtol=1e-5)
    assert g_packed.keys() == g_padded.keys() and len(g_packed) == len(list(model.parameters()))
    for n in g_padded:
        torch.testing.assert_close(g_packed[n], g_padded[n], atol=1e-5, rtol=1e-5, msg=n)


def test_grouped_attention_runs_each_pair_alone(monkeypatch):
    """An "sdpa" model is switched to ``SDPA_PACKED``: SDPA sees one pair's block at a time (with its
    mask; a one-sequence group causal without one), and forwards without spans are plain SDPA."""
    from stackllama_ds.models.packed import SDPA_PACKED

    model = _tiny(1, "sdpa").eval()
    pairs = _random_pairs()
    calls: list[tuple[int, bool, bool]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], attn_mask is not None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    row = pack_groups([pairs[0], pairs[1], [pairs[2][0]]])
    with torch.no_grad():
        packed_head_scores(model, row, "cpu")
        assert model.config._attn_implementation == SDPA_PACKED
        sizes = [e - s for s, e, _ in row.spans]
        assert calls == [(sizes[0], True, False), (sizes[1], True, False), (sizes[2], False, True)] * 2  # 2 layers
        calls.clear()
        _padded_scores(model, pairs)  # no spans: sdpa's own path, one call per layer over the 2B rows
        assert [c[0] for c in calls] == [max(len(s) for p in pairs for s in p)] * 2


def test_packed_scores_under_lora_read_the_trained_head():
    """peft wraps the score head (ModulesToSaveWrapper): the hook reads the trained copy's output."""
    from stackllama_ds.config import RMLoraConfig
    from stackllama_ds.models.load import apply_lora

    model = apply_lora(_tiny(2, "sdpa"), RMLoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), "SEQ_CLS", False)
    with torch.no_grad():  # make the trained copy differ from the frozen original
        for n, p in model.named_parameters():
            if "modules_to_save" in n and "score" in n:
                p.add_(0.5)
    pairs = _random_pairs(seed=2)
    r_packed, g_packed = _scores_and_grads(model, lambda: packed_head_scores(model, pack_pairs(pairs), "cpu"))
    r_padded, g_padded = _scores_and_grads(model, lambda: _padded_scores(model, pairs))
    torch.testing.assert_close(r_packed, r_padded, atol=1e-5, rtol=1e-5)
    assert g_packed.keys() == g_padded.keys() and any("lora_" in n for n in g_padded)
    for n in g_padded:
        torch.testing.assert_close(g_packed[n], g_padded[n], atol=1e-5, rtol=1e-5, msg=n)


def test_groups_of_many_and_of_one_score_as_alone():
    """``ask`` (N samples of one question) and PPO (one prompt, one response per sequence) shapes."""
    model = _tiny(1, "sdpa").eval()
    pairs = _random_pairs(seed=3)
    many = [[c for c, _ in pairs[:1]] + [k for _, k in pairs[:1]] + [pairs[0][0][:10] + [3, 3]]]
    ones = [[c] for c, _ in pairs]
    with torch.no_grad():
        for groups in (many, ones, many + ones):
            seqs = [s for grp in groups for s in grp]
            got = packed_head_scores(model, pack_groups(groups), "cpu")[:, 0]
            alone = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_packed_scores_under_fp32_compute_of_a_bf16_model():
    """``Fp32Compute`` (fp32 arithmetic from bf16 weights) makes the queries fp32: the bf16 blocks of the
    mask follow them, and packed and padded agree as in fp32."""
    from stackllama_ds.models.forward import fp32_compute

    model = _tiny(1, "sdpa").to(torch.bfloat16).eval()
    pairs = _random_pairs(seed=4)
    with torch.no_grad(), fp32_compute():
        got = packed_head_scores(model, pack_pairs(pairs), "cpu")
        want = _padded_scores(model, pairs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_real_pairs_share_the_whole_question(prepared_root):
    """On fitted beer pairs the common token prefix of chosen and rejected covers the question's
    prompt ``Question: q\\n\\nAnswer:``, whatever BPE merges at the answer's start."""
    from stackllama_ds.data.fit import fit_pairs
    from stackllama_ds.data.packed_pairs import common_prefix
    from stackllama_ds.data.prepare import load_prepared
    from stackllama_ds.models.load import load_tokenizer

    tok = load_tokenizer(prepared_root / "tiny", padding_side="right")
    pairs = fit_pairs(load_prepared(prepared_root / "data")["rm_train"], tok, 128, "truncate").pairs
    assert len(pairs) > 50
    for p in pairs:
        prompt = len(p.chosen) - p.len_chosen  # tokens before the answer, as fit counts them
        # -1: an answer opening with "##" leaves the prompt's last space a token of its own, which the
        # other answer's first token (" I") carries: there the shared part stops before the space
        assert common_prefix([p.chosen, p.rejected]) >= prompt - 1, p.group
    row = pack_pairs(pairs[:8])
    assert row.n_tokens == sum(len(p.chosen) + len(p.rejected) - _lcp(p.chosen.tolist(), p.rejected.tolist())
                               for p in pairs[:8])


@pytest.mark.slow
def test_packed_equals_padded_on_smollm2_bf16(prepared_root, smollm2_dir):
    """SmolLM2-135M in bf16 (the shipped dtype), 8 fitted beer pairs, ODIN's two heads: packed and padded
    scores within 0.15 absolute, the ranking loss's gradient within 8% in norm. Measured: 0.080 on scores
    up to 6.4, 3.3% (bf16 keeps 8 bits, ~0.4% per rounding; the two forwards round in different places:
    other matmul shapes, per-pair attention blocks, so 30 layers of rounding differ, not the math)."""
    from stackllama_ds.config import ModelConfig
    from stackllama_ds.data.fit import fit_pairs
    from stackllama_ds.data.prepare import load_prepared
    from stackllama_ds.models.load import load_reward_model, load_tokenizer

    tok = load_tokenizer(smollm2_dir, padding_side="right")
    pairs = fit_pairs(load_prepared(prepared_root / "data")["rm_train"], tok, 320, "truncate", limit=8).pairs
    model = load_reward_model(smollm2_dir, ModelConfig(), pad_token_id=tok.pad_token_id, dtype="bf16", num_labels=2)
    torch.manual_seed(0)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.05)
    row = pack_pairs(pairs)
    assert row.n_tokens == sum(len(p.chosen) + len(p.rejected) - _lcp(p.chosen.tolist(), p.rejected.tolist())
                               for p in pairs)
    r_packed, g_packed = _scores_and_grads(model, lambda: packed_head_scores(model, row, "cpu"))
    r_padded, g_padded = _scores_and_grads(model, lambda: _padded_scores(model, pairs, tok.pad_token_id))
    torch.testing.assert_close(r_packed, r_padded, atol=0.15, rtol=0.0)
    flat = [torch.cat([g[n].float().flatten() for n in sorted(g_padded)]) for g in (g_packed, g_padded)]
    assert (flat[0] - flat[1]).norm() <= 0.08 * flat[1].norm()


def test_reward_head_scores_packed_equal_padded(prepared_root):
    """eval/PPO/ask's text scoring: one packed row (``ask``'s samples of one question share it; PPO's
    distinct prompts each alone) gives the right-padded scores, in the callers' order."""
    from stackllama_ds.config import ModelConfig
    from stackllama_ds.data.template import format_qa
    from stackllama_ds.models.load import load_reward_model, load_tokenizer
    from stackllama_ds.models.padding import pad
    from stackllama_ds.models.scoring import pair_head_scores, reward_head_scores, right_padded_scores

    base = prepared_root / "tiny"
    tok = load_tokenizer(base, padding_side="right")
    torch.manual_seed(0)
    model = load_reward_model(base, ModelConfig(), pad_token_id=tok.pad_token_id, num_labels=2).eval()
    qs = ["Which hops for a stout?", "Is a keg better?", "Which hops for a stout?", "Why foam?",
          "Which hops for a stout?"]
    rs = ["Cascade, late.", "Yes.", "## None\nat all", "Cold glass.", "Cascade, early and late."]
    got = reward_head_scores(model, tok, qs, rs, "cpu")  # (5, 2)
    enc = tok([format_qa(q, r) for q, r in zip(qs, rs)])["input_ids"]
    ids, mask = pad(enc, tok.pad_token_id, "right")
    with torch.no_grad():
        want = right_padded_scores(lambda x: model(input_ids=x).logits.float(), ids, mask.sum(1))
        assert got.shape == (5, 2)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        pairs = [(enc[0], enc[4]), (enc[2], enc[0]), (enc[1], enc[3])]
        torch.testing.assert_close(pair_head_scores(model, pairs, tok.pad_token_id, "cpu"),
                                   want[[0, 2, 1, 4, 0, 3]], atol=1e-5, rtol=1e-5)
