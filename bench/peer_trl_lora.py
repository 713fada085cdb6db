"""The TRL side of the LoRA SFT and RM benchmarks (bench/lora_bench.py); runs in bench/peers/venv-trl116.

    bench/peers/venv-trl116/bin/python bench/peer_trl_lora.py sft SPEC.json
    bench/peers/venv-trl116/bin/python bench/peer_trl_lora.py rm SPEC.json

SPEC holds the model folder, texts (or pairs) file, sequence length, micro batch, steps, precision,
optimizer settings and the LoRA settings our run uses; TRL gets them as a ``peft.LoraConfig``
(CAUSAL_LM for SFT, SEQ_CLS for the reward model, where peft also trains the score head).
``base_dtype`` is the dtype the frozen base is loaded in (bf16: what a TRL user runs LoRA with in
bf16; fp32: TRL's default for this fp32 checkpoint, every matmul then autocast). TRL 1.16 turns
gradient checkpointing on by default; it is off here, as on our side. With ``turns`` in SPEC the
steps take turns with our run's (bench/turns.py). Prints one JSON line: each step's wall time
(``on_step_begin`` to ``on_step_end``, waiting for the turn excluded) and what one step processes.
"""

from __future__ import annotations

import json
import sys
import time

from turns import Turns


def main() -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    stage, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    base_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["base_dtype"]]
    lo = spec["lora"]
    turn = Turns(**spec["turns"]) if spec.get("turns") else None
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if turn is not None:
                turn.wait()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            if turn is not None:
                turn.passed(hold=state.global_step >= args.max_steps)

    common = dict(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1], max_grad_norm=1.0,
        lr_scheduler_type=spec["scheduler"], warmup_steps=spec["warmup_steps"], gradient_checkpointing=False,
        bf16=spec["dtype"] == "bf16", use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
        logging_steps=10_000, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        peft = LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                          target_modules=lo["target_modules"], bias="none", task_type="CAUSAL_LM")
        texts = [json.loads(x)["text"] for x in open(spec["data"])]
        args = SFTConfig(**common, max_length=spec["seq_length"], packing=True, packing_strategy="wrapped",
                         padding_free=False, dataset_text_field="text", model_init_kwargs={"dtype": base_dtype})
        trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tok, peft_config=peft, callbacks=[Clock()])
        per_step = spec["micro_batch"] * spec["seq_length"]
    else:
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        peft = LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                          target_modules=lo["target_modules"], bias="none", task_type="SEQ_CLS")
        rows = [json.loads(x) for x in open(spec["data"])]
        if spec.get("order"):  # our run's pairs in its order, read in sequence: both sides train on the same
            rows = [rows[i] for i in spec["order"]]
        ds = Dataset.from_dict({"chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]})
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=base_dtype)
        model.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        # +1: TRL appends EOS to each text; our loop scores the texts as they are.
        # disable_dropout=False: RewardConfig defaults to True and then zeroes every dropout, LoRA's
        # too; the config both sides run (and the blog's reward script) trains with LoRA dropout 0.1.
        args = RewardConfig(**common, max_length=spec["seq_length"] + 1, disable_dropout=False,
                            train_sampling_strategy="sequential" if spec.get("order") else "random")
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                                callbacks=[Clock()])
        per_step = spec["micro_batch"]
    m = trainer.model
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    trainer.train()
    print("@@RESULT " + json.dumps({
        "times": times, "per_step": per_step, "optim": str(trainer.args.optim), "trl": __import__("trl").__version__,
        "trainable": trainable, "base_dtype": str(next(m.parameters()).dtype),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
    }))


if __name__ == "__main__":
    main()
