"""``stackllama-ds export CHECKPOINT --out DIR``: any saved checkpoint -> Hugging Face folder.

Stages end by calling this on their last checkpoint, so a stage's ``model/`` and a later manual
export are made by the same code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stackllama_ds.config import LoraConfig, ModelConfig
from stackllama_ds.engines.consolidate import consolidated_state_dict
from stackllama_ds.models.hf_folder import export_hf
from stackllama_ds.run.checkpoint import CheckpointError, check_base, verify_checkpoint

# Which engine of a checkpoint holds the exported model, per kind.
ENGINE_OF = {"causal_lm": "model", "reward": "model", "actor": "actor"}


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    ckpt = Path(ckpt)
    if not (ckpt / "manifest.json").exists():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint (no manifest.json)")
    manifest = verify_checkpoint(ckpt)
    client = torch.load(ckpt / "state.pt", weights_only=False)["client"]
    kind = client["kind"]
    engine = ENGINE_OF[kind]
    # Frozen parameters left out of the checkpoint come from the base folder, which must be the one
    # the checkpoint was saved against.
    saved = manifest.get("excluded_frozen", {}).get(engine)
    if saved:
        problem = check_base(ckpt, engine, saved["base"], Path(client["base"]).resolve())
        if problem:
            raise CheckpointError(f"{problem}; not exported")
    sd = consolidated_state_dict(ckpt / engine)
    return export_hf(
        kind,
        sd,
        client["base"],
        out,
        ModelConfig(**client["model"]),
        LoraConfig(**client["lora"]) if client.get("lora") else None,
        client.get("dtype", "bf16"),
        frozen=set(saved["params"]) if saved else set(),
    )
