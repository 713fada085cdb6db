"""Write Hugging Face folders from consolidated weights (rank 0 only, no process group needed).

Kinds: ``causal_lm`` (SFT policy, PPO policy), ``reward`` (sequence classifier with its score
head), ``actor`` (policy + value head: the policy as a causal LM, the head beside it). With LoRA
the adapter is saved in ``adapter/`` and merged into the base for the main folder; the merge of a
reward model keeps its trained ``score`` head (StackLLaMA once merged it as a causal LM and lost it).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path

import torch

from stackllama_ds.config import LoraConfig, ModelConfig
from stackllama_ds.fsutil import publish_folder
from stackllama_ds.hardware import torch_dtype
from stackllama_ds.models.load import (
    ActorWithValueHead,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    value_head_path,
)


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def score_rows(sd: dict[str, torch.Tensor]) -> int:
    """Heads of the trained reward score in a state dict: 1, or 2 with ODIN's length head."""
    # plain "score.weight", or peft's trained copy "...score.modules_to_save.<adapter>.weight"
    rows = {v.shape[0] for k, v in sd.items() if re.search(r"(^|\.)score\.(modules_to_save\.[^.]+\.)?weight$", k)}
    if len(rows) != 1:
        raise RuntimeError(f"export of reward: expected one trained score weight, found shapes {sorted(rows)}")
    return rows.pop()


def _load_exact(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, frozen: Collection[str]) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Non-persistent buffers (rotary caches) are never in a state dict, and frozen parameters left
    # out of the checkpoint keep the base folder's values; anything else missing is a bug.
    missing = [k for k in missing if "rotary_emb" not in k and k not in frozen]
    if missing or unexpected:
        raise RuntimeError(f"export of {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def export_hf(
    kind: str,
    state_dict: dict[str, torch.Tensor],
    base_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    mcfg: ModelConfig,
    lora: LoraConfig | None,
    dtype: str = "bf16",
    frozen: Collection[str] = (),
) -> Path:
    """Save ``state_dict`` (as trained) as a loadable HF folder at ``out``, atomically.

    ``frozen``: names of parameters the checkpoint left out (checkpoint.py); the base folder holds them.
    """
    out = Path(out)
    lora_on = lora is not None and lora.enabled
    # Export from a full-precision, unquantised copy of the base so the merge is exact.
    plain = mcfg.model_copy(update={"quantization": "none"})
    # A reward folder is scored right-padded (real tokens keep their positions; the score is read at
    # the last non-pad token), so its tokenizer is saved that way.
    tok = load_tokenizer(base_path, padding_side="right" if kind == "reward" else "left")
    if kind == "reward":
        model = load_reward_model(base_path, plain, pad_token_id=tok.pad_token_id, dtype="fp32", lora=lora,
                                  num_labels=score_rows(state_dict))
        sd = state_dict
    else:
        model = load_causal_lm(base_path, plain, dtype="fp32", lora=lora)
        sd = _strip(state_dict, "policy.") if kind == "actor" else state_dict
        frozen = {k.removeprefix("policy.") for k in frozen} if kind == "actor" else frozen
    if lora_on:
        # Only adapters (and peft's modules_to_save, e.g. the score head) were trained; the base
        # comes from its folder, which also makes exports of 8-/4-bit bases exact.
        sd = {k: v for k, v in sd.items() if "lora_" in k or "modules_to_save" in k}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or not sd:
            raise RuntimeError(f"export of {kind}: adapter keys do not match: {unexpected[:5]}")
    else:
        _load_exact(model, sd, kind, frozen)
    with publish_folder(out) as tmp:
        if lora_on:
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.to(torch_dtype(dtype)).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if kind == "actor":
            from safetensors.torch import save_file

            head = _strip(state_dict, "v_head.")
            if head:
                save_file({k: v.contiguous() for k, v in head.items()}, str(value_head_path(tmp)))
            elif value_head_path(base_path).exists():  # frozen (a separate critic), so not saved
                shutil.copyfile(value_head_path(base_path), value_head_path(tmp))
    return out


def load_value_head(actor: ActorWithValueHead, model_dir: str | os.PathLike[str]) -> bool:
    """Initialise the value head from an exported actor folder when it has one."""
    p = value_head_path(model_dir)
    if not p.exists():
        return False
    from safetensors.torch import load_file

    actor.v_head.load_state_dict(load_file(str(p)))
    return True
