"""The TRL side of the PPO benchmark: classic PPOTrainer (trl 0.11.4, transformers 4.46), the StackLLaMA loop.

    bench/peers/venv-trl011/bin/python bench/peer_trl_ppo.py SPEC.json

Per step: generate ``response_len`` tokens for the same prompts our run uses (plain sampling,
min_new_tokens = max_new_tokens so both sides generate exactly as many tokens), score question +
response with the same sequence classifier, ``ppo_trainer.step``. Prints one JSON line with the
time split of every step.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    spec = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    # transformers 4.46 cannot read the tokenizer_config.json transformers 5 writes
    # ("TokenizersBackend"): build the same fast tokenizer from tokenizer.json.
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{spec['model']}/tokenizer.json", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>", padding_side="left")
    cfg = PPOConfig(
        model_name=spec["model"], learning_rate=spec["lr"], batch_size=spec["batch_size"],
        mini_batch_size=spec["mini_batch_size"], gradient_accumulation_steps=1, ppo_epochs=spec["ppo_epochs"],
        init_kl_coef=0.2, adap_kl_ctrl=True, target=6.0, horizon=10000, early_stopping=False,
        log_with=None, seed=0,
        accelerator_kwargs={"cpu": True, "mixed_precision": "bf16" if spec["dtype"] == "bf16" else "no"},
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(spec["model"])
    reward = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1)
    reward.config.pad_token_id = tok.pad_token_id
    reward.eval()
    if spec["dtype"] == "bf16":
        reward.to(torch.bfloat16)
    trainer = PPOTrainer(cfg, model, ref_model=None, tokenizer=tok)
    R = spec["response_len"]
    gen = {"do_sample": True, "top_k": 0, "top_p": 1.0, "min_new_tokens": R, "max_new_tokens": R,
           "pad_token_id": tok.pad_token_id}
    rows = []
    for step in spec["steps"]:
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
        rows.append({"t_generate": t1 - t0, "t_score": t2 - t1, "t_step": t3 - t2, "total": t3 - t0,
                     "response_tokens": sum(len(r) for r in responses)})
    print("@@RESULT " + json.dumps({"rows": rows, "trl": __import__("trl").__version__}))


if __name__ == "__main__":
    main()
