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

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    except (ValueError, FileNotFoundError, KeyError, AssertionError):
        # ZeRO-0 writes no partitioned optimizer files: the module states hold every weight.
        blob = torch.load(ds_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = blob["module"]
    return {k: v.detach().float().cpu() for k, v in sd.items()}
