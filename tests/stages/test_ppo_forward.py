"""PPO's forwards skip all-padding prompt columns and run heads on the response tail: same numbers
as the full-width forward sliced at P-1:-1 (the formula), for any left padding."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stackllama_ds.models.forward import critic_values, policy_forward, response_logprobs
from stackllama_ds.models.load import ActorWithValueHead, TokenValueModel
from stackllama_ds.models.padding import position_ids_from_mask, trim_left_padding
from stackllama_ds.rl import logprobs_from_logits

CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0)


def batch(prompt_lens: list[int], P: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (len(prompt_lens), P + T), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(prompt_lens):
        ids[i, : P - n], mask[i, : P - n] = 0, 0
    mask[0, -3:] = 0  # a response that ended early (right padding after EOS)
    return ids, mask


def test_trim_left_padding_drops_only_all_pad_columns():
    ids, mask = batch([3, 5], P=9, T=4)
    t_ids, t_mask, P = trim_left_padding(ids, mask, 9)
    assert P == 5 and t_ids.shape == (2, 9)
    assert torch.equal(t_ids, ids[:, 4:]) and torch.equal(t_mask, mask[:, 4:])
    assert torch.equal(position_ids_from_mask(t_mask), position_ids_from_mask(mask)[:, 4:])
    # a full-length prompt keeps every column
    assert trim_left_padding(*batch([9, 2], P=9, T=4), 9)[2] == 9


def test_policy_and_reference_forwards_match_full_width_formula():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    actor = ActorWithValueHead(lm).eval()
    ids, mask = batch([2, 6, 4], P=10, T=7)
    P = 10
    with torch.no_grad():
        lp, values, logits = policy_forward(actor, ids, mask, P)
        # the formula on the untrimmed batch: position P+t-1 predicts response token t
        pos = position_ids_from_mask(mask)
        h = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        full_logits = lm.lm_head(h)[:, P - 1 : -1]
        full_values = actor.v_head(h).squeeze(-1)[:, P - 1 : -1]
        full_lp = logprobs_from_logits(full_logits, ids[:, P:])
        ref_lp, ref_logits = response_logprobs(lm, ids, mask, P)
    assert lp.shape == values.shape == (3, 7) and logits.shape == (3, 7, 97)
    m = mask[:, P:].bool()  # compare where the response is real
    torch.testing.assert_close(lp[m], full_lp[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[m], full_values[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_lp[m], full_lp[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_logits[m], full_logits[m], atol=1e-5, rtol=1e-5)


def test_critic_values_match_full_width_formula():
    torch.manual_seed(1)
    critic = TokenValueModel(LlamaForSequenceClassification(LlamaConfig(**CFG, num_labels=1))).eval()
    ids, mask = batch([3, 8], P=8, T=5, seed=1)
    with torch.no_grad():
        v = critic_values(critic, ids, mask, 8)
        full = critic(ids, mask, position_ids_from_mask(mask))[:, 7:-1]
    m = mask[:, 8:].bool()
    assert v.shape == (2, 5)
    torch.testing.assert_close(v[m], full[m], atol=1e-5, rtol=1e-5)


def test_rollout_forwards_are_the_same_at_any_forward_batch_size():
    """ppo.forward_batch_size only changes how many rows share a forward: same figures per row
    (rows padded together differ, trim_left_padding keeps the numbers)."""
    from types import SimpleNamespace

    from stackllama_ds.config import PPOConfig
    from stackllama_ds.stages.ppo_steps import Engines, rollout_forwards

    torch.manual_seed(0)
    actor = ActorWithValueHead(LlamaForCausalLM(LlamaConfig(**CFG)))
    ref = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    engine = SimpleNamespace(module=actor, eval=actor.eval, train=actor.train)  # what rollout_forwards uses
    ids, mask = batch([2, 6, 4, 9, 1], P=10, T=7)
    e = Engines(actor=engine, critic=None, ref=ref, reward=None, gen_copy=None)
    outs = [rollout_forwards(e, ids, mask, 10, PPOConfig(mini_batch_size=1, gradient_accumulation_steps=1,
                                                         batch_size=5, forward_batch_size=f))
            for f in (None, 2, 5)]
    m = mask[:, 10:].bool()
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert a.shape == b.shape == (5, 7)
            torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)
    assert actor.training  # put back in train mode


def _bf16_lora_actor(b_std: float) -> ActorWithValueHead:
    """A bf16 LoRA actor whose adapter is ``b_std`` from the identity: the reference is its base.
    Weights at std 0.1 give peaked logits, as a trained model has (at 0.02 they are near uniform)."""
    from stackllama_ds.config import LoraConfig
    from stackllama_ds.models.load import apply_lora

    cfg = LlamaConfig(**{**CFG, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384,
                         "num_hidden_layers": 4, "num_key_value_heads": 2, "initializer_range": 0.1})
    torch.manual_seed(0)
    lm = apply_lora(LlamaForCausalLM(cfg), LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0), "CAUSAL_LM", False)
    actor = ActorWithValueHead(lm).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    for n, p in actor.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * b_std)
    return actor


def test_bf16_rollout_kl_near_the_reference_is_the_fp32_kl():
    """PPO's KL estimate (per response, sum of logp - logp_ref) from a bf16 actor whose LoRA adapter is
    1e-4 from the identity: that of the same weights computed in fp32, within 2e-3 nats.

    Two bf16 forwards of nearly equal functions each carry their own rounding error once one bit
    differs (here up to 0.2 nats per response, on SmolLM2-135M +-0.5); the rollout forwards run in
    fp32 arithmetic (``ppo.rollout_fp32``). What remains is peft rounding the adapter's input to the
    bf16 of its weights: a relative 2^-9 of a KL below 0.05 (measured 2e-4). With the adapter at the
    identity (PPO's first step), both give exactly 0.
    """
    from types import SimpleNamespace

    from stackllama_ds.config import PPOConfig
    from stackllama_ds.stages.ppo_steps import Engines, rollout_forwards

    def seq_kl(actor, ids, mask) -> torch.Tensor:
        e = Engines(actor=SimpleNamespace(module=actor, eval=actor.eval, train=actor.train), critic=None, ref=None,
                    reward=None, gen_copy=None)
        fw = rollout_forwards(e, ids, mask, 8, PPOConfig(mini_batch_size=8, gradient_accumulation_steps=1, batch_size=8))
        assert fw.logprobs.dtype == torch.float32
        return ((fw.logprobs - fw.ref_logprobs) * mask[:, 8:]).sum(1)  # (B,)

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 1024, (8, 8 + 32), generator=g)
    mask = torch.ones_like(ids)
    for b_std in (0.0, 1e-4):
        actor = _bf16_lora_actor(b_std)
        kl = seq_kl(actor, ids, mask)
        exact = seq_kl(_bf16_lora_actor(b_std).float(), ids, mask)  # the same bf16 values, fp32 arithmetic
        if b_std == 0.0:
            assert kl.abs().max() == 0.0 and exact.abs().max() == 0.0
        else:
            assert exact.abs().max() < 0.05  # the two policies are this close
            assert (kl - exact).abs().max() < 2e-3, (kl - exact).tolist()
