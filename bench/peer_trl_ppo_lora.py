"""The TRL side of the LoRA PPO benchmark (bench/lora_bench.py): classic PPOTrainer (trl 0.11.4) with peft.

    bench/peers/venv-trl011/bin/python bench/peer_trl_ppo_lora.py SPEC.json

As the blog's script: ``AutoModelForCausalLMWithValueHead.from_pretrained(model, peft_config=...)``
and ``ref_model=None``, so the reference is the same model with its adapter disabled. Per step:
generate ``response_len`` tokens for the prompts our run uses (plain sampling, min_new_tokens =
max_new_tokens so both sides generate exactly as many tokens), score question + response with the
sequence classifier, ``ppo_trainer.step``. With ``turns`` in SPEC the steps take turns with our run's
(bench/turns.py). Prints one JSON line with the time split of every step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from turns import Turns


def tokenizer(folder: str):
    """transformers 4.46 cannot read the tokenizer_config.json transformers 5 writes ("TokenizersBackend"):
    the same fast tokenizer from tokenizer.json, with the special tokens that config names."""
    from transformers import PreTrainedTokenizerFast

    tc = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    special = {k: tc[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if tc.get(k)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), padding_side="left", **special)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def config(folder: str):
    """transformers 4.46 reads rope_theta, transformers 5 writes rope_parameters: carry it over, or the
    peer would run SmolLM2 at the default theta of 10,000 (same cost, wrong model)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        cfg.rope_theta = rp["rope_theta"]
    return cfg


def main() -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    spec = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    tok = tokenizer(spec["model"])
    base_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["base_dtype"]]
    lo = spec["lora"]
    cfg = PPOConfig(
        model_name=spec["model"], learning_rate=spec["lr"], batch_size=spec["batch_size"],
        mini_batch_size=spec["mini_batch_size"], gradient_accumulation_steps=1, ppo_epochs=spec["ppo_epochs"],
        init_kl_coef=0.2, adap_kl_ctrl=True, target=6.0, horizon=10000, early_stopping=False,
        max_grad_norm=spec["max_grad_norm"], log_with=None, seed=0,
        accelerator_kwargs={"cpu": True, "mixed_precision": "bf16" if spec["dtype"] == "bf16" else "no"},
    )
    peft = LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                      target_modules=lo["target_modules"], bias="none", task_type="CAUSAL_LM")
    mc = config(spec["model"])
    model = AutoModelForCausalLMWithValueHead.from_pretrained(spec["model"], config=mc, peft_config=peft,
                                                              torch_dtype=base_dtype)
    rc = config(spec["model"])
    rc.num_labels = 1
    reward = AutoModelForSequenceClassification.from_pretrained(spec["model"], config=rc, torch_dtype=base_dtype)
    reward.config.pad_token_id = tok.pad_token_id
    reward.eval()
    if spec["dtype"] == "bf16":
        reward.to(torch.bfloat16)
    trainer = PPOTrainer(cfg, model, ref_model=None, tokenizer=tok)
    assert trainer.is_peft_model, "the reference must be the adapter-disabled policy"
    R = spec["response_len"]
    gen = {"do_sample": True, "top_k": 0, "top_p": 1.0, "min_new_tokens": R, "max_new_tokens": R,
           "pad_token_id": tok.pad_token_id}
    turn = Turns(**spec["turns"]) if spec.get("turns") else None
    rows = []
    for i, step in enumerate(spec["steps"]):
        if turn is not None:
            turn.wait()
        t0 = time.perf_counter()
        queries = [torch.tensor(ids) for ids in step["prompt_ids"]]
        responses = trainer.generate(queries, return_prompt=False, batch_size=len(queries), **gen)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        t1 = time.perf_counter()
        full = [f"Question: {q}\n\nAnswer: {r}" for q, r in zip(step["questions"], texts)]
        tok.padding_side = "right"
        enc = tok(full, return_tensors="pt", padding=True, return_token_type_ids=False)
        tok.padding_side = "left"
        with torch.no_grad():
            scores = reward(**enc).logits[:, 0].float()
        t2 = time.perf_counter()
        trainer.step(queries, list(responses), list(scores))
        t3 = time.perf_counter()
        if turn is not None:
            turn.passed(hold=i == len(spec["steps"]) - 1)
        rows.append({"t_generate": t1 - t0, "t_score": t2 - t1, "t_step": t3 - t2, "total": t3 - t0,
                     "response_tokens": sum(len(r) for r in responses)})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("@@RESULT " + json.dumps({"rows": rows, "trl": __import__("trl").__version__, "trainable": trainable,
                                    "base_dtype": str(next(model.pretrained_model.parameters()).dtype)}))


if __name__ == "__main__":
    main()
