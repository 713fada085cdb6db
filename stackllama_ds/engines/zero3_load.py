"""Fill a model built under ``deepspeed.zero.Init`` from a safetensors checkpoint, each rank reading
only the bytes of its own partitions.

transformers' ZeRO-3 loading reads the whole state dict on rank 0 (through a memory map, so the
checkpoint's pages count in that rank's RSS while it loads) and gathers every module whole on every
rank to copy it in. Here each rank ``pread``s, per tensor, the byte range of the flat slice its
``ds_tensor`` holds and copies it in place: no collective, no memory map, no rank ever holds more
than one partition of one tensor beyond its own shards. Measured in ``bench/zero3_load_rss.py``.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}}`` (offsets relative to the end
of the header), then the data, row-major. Sharded folders list ``weight_map`` in
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as safetensors; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: ``file`` from byte ``begin`` (absolute), row-major."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors of one ``.safetensors`` file, checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{file}: header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{file}: header is not JSON ({e})") from e
    out: dict[str, TensorEntry] = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[h["dtype"]]
            begin, end = (int(x) for x in h["data_offsets"])
            shape = tuple(int(s) for s in h["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: tensor {name!r}: unreadable entry {h!r} ({e!r})") from e
        entry = TensorEntry(file, dtype, shape, 8 + n + begin, end - begin)
        if entry.nbytes != entry.numel * dtype.itemsize or entry.begin + entry.nbytes > size or begin < 0:
            raise CheckpointError(f"{file}: tensor {name!r}: offsets [{begin}, {end}) do not fit shape {shape} "
                                  f"{h['dtype']} in a {size}-byte file")
        out[name] = entry
    return out


def checkpoint_index(folder: str | os.PathLike[str]) -> dict[str, TensorEntry] | None:
    """Every tensor of an HF model folder saved as safetensors (one file or sharded); None if it
    has no safetensors checkpoint (e.g. ``pytorch_model.bin`` only)."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        out: dict[str, TensorEntry] = {}
        for file in sorted(set(weight_map.values())):
            out.update(read_header(folder / file))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{folder / INDEX}: {len(missing)} tensors listed but absent from their "
                                  f"shard files, e.g. {missing[0]!r}")
        return out
    if (folder / SINGLE).exists():
        return read_header(folder / SINGLE)
    return None


def _pread(entry: TensorEntry, offset: int, view: memoryview) -> None:
    """Fill ``view`` from ``entry.file`` at byte ``offset`` (no memory map: the page cache stays out
    of this process's RSS)."""
    fd = os.open(entry.file, os.O_RDONLY)
    try:
        got = 0
        while got < len(view):  # preadv may return short (at most 2 GiB per call on Linux)
            k = os.preadv(fd, [view[got:]], offset + got)
            if k == 0:
                raise CheckpointError(f"{entry.file}: ended at byte {offset + got}, inside a tensor")
            got += k
    finally:
        os.close(fd)


def read_range(entry: TensorEntry, start: int, count: int) -> torch.Tensor:
    """Elements ``[start, start + count)`` of the flattened tensor (1-D, file dtype)."""
    out = torch.empty(count, dtype=entry.dtype)
    read_into(entry, start, out)
    return out


def read_into(entry: TensorEntry, start: int, out: torch.Tensor) -> None:
    """Elements ``[start, start + out.numel())`` of the flattened tensor into ``out`` (any dtype and
    device): straight into its memory when it is a contiguous CPU tensor of the file's dtype, else
    through one staging buffer of that size."""
    size = entry.dtype.itemsize
    if out.numel() == 0:
        return
    if out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous():
        _pread(entry, entry.begin + start * size, memoryview(out.view(-1).view(torch.uint8).numpy()))
        return
    staging = torch.empty(out.numel(), dtype=entry.dtype)
    _pread(entry, entry.begin + start * size, memoryview(staging.view(torch.uint8).numpy()))
    out.copy_(staging.view(out.shape))


def _checkpoint_names(model: nn.Module, index: dict[str, TensorEntry]) -> dict[str, str | None] | None:
    """Model state name -> checkpoint name for every parameter and persistent buffer, allowing the
    base-model prefix to be present on one side only (as transformers does). A head outside the
    base model may be absent (-> None: a reward head on a causal-LM folder); None overall when a
    shape differs or the base model itself lacks a tensor (the caller falls back to transformers)."""
    prefix = getattr(model, "base_model_prefix", "")
    names: dict[str, str | None] = {}
    for name, t in _state(model).items():
        candidates = [name]
        if prefix:
            candidates.append(name.removeprefix(prefix + ".") if name.startswith(prefix + ".") else f"{prefix}.{name}")
        hit = next((c for c in candidates if c in index), None)
        if hit is None and (not prefix or name.startswith(prefix + ".")):
            return None
        if hit is not None and index[hit].shape != tuple(getattr(t, "ds_shape", t.shape)):
            return None
        names[name] = hit
    # a module is either read whole or initialised whole (its init would overwrite what was read)
    missing_owners = {_owner(n) for n, hit in names.items() if hit is None}
    if any(hit is not None and _owner(n) in missing_owners for n, hit in names.items()):
        return None
    return names if any(v is not None for v in names.values()) else None


def _owner(name: str) -> str:
    """The module a parameter or buffer belongs to: ``score.weight`` -> ``score``."""
    return name.rpartition(".")[0]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once) and persistent buffers, by their state-dict names."""
    out: dict[str, torch.Tensor] = dict(model.named_parameters())
    for mod_name, mod in model.named_modules():
        for b_name, b in mod.named_buffers(recurse=False):
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{b_name}" if mod_name else b_name] = b
    return out


def fill_partitions(model: nn.Module, index: dict[str, TensorEntry]) -> list[str] | None:
    """Copy the checkpoint ``index`` (``checkpoint_index`` of its folder) into ``model`` (built under ``deepspeed.zero.Init``, not
    yet given to ``deepspeed.initialize``): each ZeRO parameter's own flat slice into its
    ``ds_tensor``, whole tensors into the rest. Returns the names of head tensors the folder lacks
    (for the caller to initialise), or None, having written nothing, when the checkpoint does not
    match the model (renamed keys, other shapes): transformers' loader then handles it.
    """
    import deepspeed.comm as ds_comm
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    names = _checkpoint_names(model, index)
    if names is None:
        return None
    state = _state(model)
    for t in state.values():
        if hasattr(t, "ds_tensor") and (t.ds_status != ZeroParamStatus.NOT_AVAILABLE
                            or getattr(t, "ds_secondary_tensor", None) is not None
                            or getattr(t.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme):
            return None  # gathered, hierarchical (ZeRO++) or NVMe partitions: layouts this reader does not write
    with torch.no_grad():
        for name, t in state.items():
            if names[name] is None:
                continue
            entry = index[names[name]]
            if hasattr(t, "ds_tensor"):
                # DeepSpeed's layout: rank r of the param's group holds flat elements
                # [r * P, (r + 1) * P) of the tensor, padded past its end (P = ds_tensor.numel()).
                part = t.ds_tensor.view(-1)
                start = ds_comm.get_rank(group=t.ds_process_group) * part.numel()
                count = max(0, min(part.numel(), entry.numel - start))
                read_into(entry, start, part[:count])
                part[count:].zero_()
            else:
                read_into(entry, 0, t.data)
    return [name for name, hit in names.items() if hit is None]


def partitioned_from_folder(auto_cls, folder: str | os.PathLike[str], *, dtype: torch.dtype,
                            attn_implementation: str | None, **config_kwargs) -> nn.Module | None:
    """``auto_cls.from_pretrained(folder)`` for a live ZeRO-3 HfDeepSpeedConfig: the model built
    partitioned with no weight init, then ``fill_partitions``; heads the folder lacks are initialised
    as transformers does. None, having kept nothing, when this transformers lacks the hooks used or
    the checkpoint does not match the model; the caller then runs transformers' own ZeRO-3 load
    (rank 0 reads the whole checkpoint through a memory map and every rank gathers each module
    whole to copy it in)."""
    try:
        import deepspeed
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import deepspeed_config, prevent_arange_dtype_change
        from transformers.modeling_utils import set_zero3_state
    except ImportError:  # transformers < 5
        return None
    from transformers import AutoConfig

    index = checkpoint_index(folder)
    if index is None:
        return None
    config = AutoConfig.from_pretrained(str(folder), **config_kwargs)
    init = deepspeed.zero.Init(config_dict_or_path=deepspeed_config())
    if hasattr(init, "_convert_to_deepspeed_param"):
        # Init broadcasts each new parameter whole from rank 0 (to agree on random weights) before
        # partitioning it: every other rank writes a full copy of each module in turn (peak RSS of
        # the largest module, e.g. the embedding). Every partition is read from the checkpoint below.
        init._zero_init_param = lambda param: (init._convert_to_deepspeed_param(param), param.partition())
    # transformers' own from_pretrained contexts under ZeRO-3; set_zero3_state tells from_config that
    # Init is already open, so it neither nests one nor re-initialises every module gathered whole.
    with no_init_weights(), prevent_arange_dtype_change(), init, set_zero3_state():
        model = auto_cls.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # tied embeddings: one parameter (and one checkpoint tensor) for both names
    missing = fill_partitions(model, index)
    if missing is None:
        return None
    if missing:  # heads the folder lacks: transformers' own init of their modules, done on rank 0
        owners = {_owner(n) for n in missing}
        for mod_name, mod in model.named_modules():
            if mod_name in owners:
                with deepspeed.zero.GatheredParameters(list(mod.parameters(recurse=False)), modifier_rank=0):
                    if deepspeed.comm.get_rank() == 0:
                        model._init_weights(mod)
        if deepspeed.comm.get_rank() == 0:
            print(f"{folder}: {', '.join(sorted(missing))} not in the checkpoint: initialised", file=sys.stderr)
    if getattr(model, "can_generate", lambda: False)() and (Path(folder) / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))  # as from_pretrained keeps it
    return model.eval()  # as from_pretrained returns it
