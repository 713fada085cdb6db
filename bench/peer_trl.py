"""The TRL side of the SFT and RM benchmarks; runs inside bench/peers/venv-trl116 (trl 1.16).

    bench/peers/venv-trl116/bin/python bench/peer_trl.py sft SPEC.json
    bench/peers/venv-trl116/bin/python bench/peer_trl.py rm SPEC.json

SPEC holds the model folder, the texts (or pairs) file, sequence length, micro batch, steps,
precision and optimizer settings the our-side run uses. Prints one JSON line: per-step wall times
(between consecutive ``on_step_end`` callbacks) and what one step processes.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    stage, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    tok = AutoTokenizer.from_pretrained(spec["model"])
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    common = dict(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1], max_grad_norm=1.0,
        lr_scheduler_type=spec["scheduler"], warmup_steps=spec["warmup_steps"],
        bf16=spec["dtype"] == "bf16", use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
        logging_steps=10_000, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        texts = [json.loads(x)["text"] for x in open(spec["data"])]
        ds = Dataset.from_dict({"text": texts})
        args = SFTConfig(**common, max_length=spec["seq_length"], packing=True, packing_strategy="wrapped",
                         padding_free=False, dataset_text_field="text")
        trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[Clock()])
        per_step = spec["micro_batch"] * spec["seq_length"]
    else:
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        rows = [json.loads(x) for x in open(spec["data"])]
        ds = Dataset.from_dict({"chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]})
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        # +1: TRL appends EOS to each text; our loop scores the texts as they are.
        args = RewardConfig(**common, max_length=spec["seq_length"] + 1)
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        per_step = spec["micro_batch"]
    trainer.train()
    print("@@RESULT " + json.dumps({"stamps": stamps, "per_step": per_step,
                                    "optim": str(trainer.args.optim), "trl": __import__("trl").__version__}))


if __name__ == "__main__":
    main()
