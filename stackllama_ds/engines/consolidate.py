"""Full weights out of a DeepSpeed checkpoint folder, whatever the ZeRO stage and world size."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch


def consolidated_state_dict(ds_dir: str | Path, tag: str = "ds") -> dict[str, torch.Tensor]:
    """fp32 state dict of the whole module (ZeRO-1/2/3 shards merged; ZeRO-0 read directly).

    Uses DeepSpeed's zero_to_fp32 (the fp32 master weights, not the 16-bit copies) so an export
    equals what the optimizer holds, and needs no process group.
    """
    ds_dir = Path(ds_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = ds_dir / tag / "mp_rank_00_model_states.pt"  # ZeRO-0/1/2 (ZeRO-3 names it per rank)
    blob = torch.load(states, map_location="cpu", weights_only=False) if states.exists() else None
    if blob is not None and blob.get("param_shapes") is None:
        # ZeRO-0 has no partitioned optimizer (zero_to_fp32 fails on it with a TypeError): the module
        # states hold every weight (under bf16, the bf16 copy of the fp32 master weights).
        return {k: v.detach().float().cpu() for k, v in blob["module"].items()}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    except (ValueError, FileNotFoundError, KeyError, AssertionError):
        if blob is None:
            raise
        sd = blob["module"]
    return {k: v.detach().float().cpu() for k, v in sd.items()}
