"""The sides of bench/stage_bench.py that are not our stages: TRL's trainers and the matmul probe.

    bench/peers/venv-trl116/bin/python bench/peer.py sft|rm SPEC.json   # trl 1.16 SFTTrainer / RewardTrainer
    bench/peers/venv-trl011/bin/python bench/peer.py ppo SPEC.json      # trl 0.11.4 PPOTrainer (StackLLaMA's)
    .venv/bin/python bench/peer.py matmul SPEC.json                      # the rate at a step's shapes

stage_bench.py writes SPEC from our run's validated config (model, our data in our order, lengths, batch,
optimizer, dtype, LoRA or ``null``, the side's turn); ``base_dtype`` is the dtype the model loads in.
Prints ``@@RESULT {json}``: each step's seconds, waiting excluded. The matmul side runs a step's FLOPs of
F.linear at the model's shapes in each turn: the rate under the same load as the steps beside it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from turns import Turns


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _lora(spec: dict, task: str):
    """peft's LoraConfig of the spec's LoRA, None without (SEQ_CLS: peft also trains the score head)."""
    from peft import LoraConfig

    lo = spec["lora"]
    return lo and LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                             target_modules=lo["target_modules"], bias="none", task_type=task)


def trainer_side(stage: str, spec: dict, turn: Turns) -> dict:
    """TRL 1.16's SFTTrainer (packing, wrapped) or RewardTrainer, with peft's LoRA where the spec has one."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    tok, dtype, times = AutoTokenizer.from_pretrained(spec["model"]), _dtype(spec["base_dtype"]), []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            turn.wait()

        def on_step_end(self, args, state, control, **kw):
            times.append(turn.passed(hold=state.global_step >= args.max_steps))

    # TRL 1.16 turns gradient checkpointing on by default: off unless asked, as on our side.
    common = dict(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1], max_grad_norm=1.0,
        lr_scheduler_type=spec["scheduler"], warmup_steps=spec["warmup_steps"],
        gradient_checkpointing=spec["gradient_checkpointing"], bf16=spec["dtype"] == "bf16", use_cpu=True,
        report_to=[], save_strategy="no", eval_strategy="no", logging_steps=10_000, dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    rows = [json.loads(x) for x in open(spec["data"])]
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, max_length=spec["seq_length"], packing=True, packing_strategy="wrapped",
                         padding_free=False, dataset_text_field="text", model_init_kwargs={"dtype": dtype})
        ds = Dataset.from_dict({"text": [r["text"] for r in rows]})
        trainer = SFTTrainer(model=spec["model"], args=args, processing_class=tok, train_dataset=ds,
                             peft_config=_lora(spec, "CAUSAL_LM"), callbacks=[Clock()])
    else:
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        rows = [rows[i] for i in spec["order"]]  # our run's pairs in its order, read in sequence
        ds = Dataset.from_dict({k: [r[k] for r in rows] for k in ("chosen", "rejected")})
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        # +1: TRL appends EOS to each text; our loop scores the texts as they are. disable_dropout=False:
        # RewardConfig zeroes every dropout by default, LoRA's too; ours (and the blog's) trains with it.
        args = RewardConfig(**common, max_length=spec["seq_length"] + 1, disable_dropout=False,
                            train_sampling_strategy="sequential")
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                peft_config=_lora(spec, "SEQ_CLS"), callbacks=[Clock()])
    m, ta = trainer.model, trainer.args
    info = {"trainable": sum(p.numel() for p in m.parameters() if p.requires_grad), "optim": str(ta.optim),
            "base_dtype": str(next(m.parameters()).dtype),
            "gradient_checkpointing": ta.gradient_checkpointing}
    trainer.train()
    return {"times": times, **info}


def _tokenizer(folder: str):
    """transformers 4.46 cannot read the tokenizer_config.json transformers 5 writes ("TokenizersBackend"):
    the same fast tokenizer from tokenizer.json, with the special tokens that config names."""
    from transformers import PreTrainedTokenizerFast

    tc = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    special = {k: tc[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if tc.get(k)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), padding_side="left",
                                  **special)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _config(folder: str, **kw):
    """transformers 4.46 reads rope_theta, transformers 5 writes rope_parameters: carry it over, or the
    peer would run SmolLM2 at the default theta of 10,000 (same cost, wrong model)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder, **kw)
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        cfg.rope_theta = rp["rope_theta"]
    return cfg


def ppo_side(spec: dict, turn: Turns) -> dict:
    """TRL 0.11.4's PPOTrainer as the blog's script: the policy with a value head (``peft_config`` where the
    spec has LoRA, the reference then being the adapter disabled; else a frozen copy), per step generate
    exactly ``response_len`` tokens for our prompts, score question + response, ``ppo_trainer.step``."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.manual_seed(0)
    tok, lo, dtype = _tokenizer(spec["model"]), spec["lora"], _dtype(spec["base_dtype"])
    cfg = PPOConfig(
        model_name=spec["model"], learning_rate=spec["lr"], batch_size=spec["batch_size"],
        mini_batch_size=spec["mini_batch_size"], gradient_accumulation_steps=1, ppo_epochs=spec["ppo_epochs"],
        init_kl_coef=0.2, adap_kl_ctrl=True, target=6.0, horizon=10000, early_stopping=False,
        max_grad_norm=spec["max_grad_norm"], log_with=None, seed=0,
        accelerator_kwargs={"cpu": True, "mixed_precision": "bf16" if spec["dtype"] == "bf16" else "no"})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        spec["model"], config=_config(spec["model"]), peft_config=_lora(spec, "CAUSAL_LM"), torch_dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(
        spec["model"], config=_config(spec["model"], num_labels=1), torch_dtype=dtype)
    reward.config.pad_token_id = tok.pad_token_id
    reward.eval()
    if spec["dtype"] == "bf16":
        reward.to(torch.bfloat16)
    trainer = PPOTrainer(cfg, model, ref_model=None, tokenizer=tok)
    assert trainer.is_peft_model == bool(lo), "with LoRA the reference is the adapter-disabled policy"
    R = spec["response_len"]
    gen = {"do_sample": True, "top_k": 0, "top_p": 1.0, "min_new_tokens": R, "max_new_tokens": R,
           "pad_token_id": tok.pad_token_id}
    rows = []
    for i, step in enumerate(spec["steps"]):
        turn.wait()
        t0 = time.perf_counter()
        queries = [torch.tensor(ids) for ids in step["prompt_ids"]]
        responses = trainer.generate(queries, return_prompt=False, batch_size=len(queries), **gen)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        t1 = time.perf_counter()
        tok.padding_side = "right"
        enc = tok([f"Question: {q}\n\nAnswer: {r}" for q, r in zip(step["questions"], texts)],
                  return_tensors="pt", padding=True, return_token_type_ids=False)
        tok.padding_side = "left"
        with torch.no_grad():
            scores = reward(**enc).logits[:, 0].float()
        t2 = time.perf_counter()
        trainer.step(queries, list(responses), list(scores))
        rows.append({"t_generate": t1 - t0, "t_score": t2 - t1, "t_step": time.perf_counter() - t2,
                     "total": turn.passed(hold=i == len(spec["steps"]) - 1)})
    return {"rows": rows, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "base_dtype": str(next(model.pretrained_model.parameters()).dtype)}


def matmul_side(spec: dict, turn: Turns) -> dict:
    import torch
    import torch.nn.functional as F

    td, rows = _dtype(spec["dtype"]), spec["rows"]
    mats = [(torch.randn(rows, i, dtype=td), torch.randn(o, i, dtype=td), c) for i, o, c in spec["linears"]]
    per_set = sum(2 * rows * w.shape[0] * w.shape[1] * c for _, w, c in mats)
    for x, w, _ in mats:  # warm the kernels up outside the timed turns
        F.linear(x, w)
    out = []
    for k in range(spec["steps"]):
        turn.wait()
        done = 0
        while done < spec["flops"]:
            for x, w, c in mats:
                for _ in range(c):
                    F.linear(x, w)
            done += per_set
        out.append({"t": turn.passed(hold=k == spec["steps"] - 1), "flops": done})
    return {"turns": out}


def main() -> None:
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    import torch

    stage, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    torch.set_num_threads(spec["threads"])
    turn = Turns(**spec["turns"])
    res = ppo_side(spec, turn) if stage == "ppo" else matmul_side(spec, turn) if stage == "matmul" \
        else trainer_side(stage, spec, turn)
    print("@@RESULT " + json.dumps({**res, "stage": stage}))


if __name__ == "__main__":
    main()
