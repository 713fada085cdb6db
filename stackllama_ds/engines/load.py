"""ZeRO-3 construction around the models/ builders: under ``zero3_init`` they build each model
already partitioned, every rank reading only its own bytes of the checkpoint.

    with zero3_init(eng, cfg.model):
        model = load_causal_lm(path, cfg.model, dtype=trainable_dtype(eng), lora=lora)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from stackllama_ds.config import EngineConfig, ModelConfig
from stackllama_ds.engines import dist
from stackllama_ds.engines.ds_config import ds_config
from stackllama_ds.engines.zero3_load import partitioned_from_folder
from stackllama_ds.hardware import has_cuda
from stackllama_ds.models.load import pretrained_reader


def trainable_dtype(eng: EngineConfig) -> str:
    """What a trainable model is loaded in: the engine's own dtype. Every DeepSpeed engine casts the
    module to that dtype and takes its fp32 master copy (ZeRO partitions or BF16_Optimizer) from the
    cast weights, so loading in fp32 first gives the same numbers and only costs host memory: a full
    fp32 copy on the way (4 bytes a parameter: 28 GB per 7B rank)."""
    return eng.dtype


@contextmanager
def zero3_init(eng: EngineConfig, mcfg: ModelConfig) -> Iterator[None]:
    """Load models for a ZeRO-3 engine already partitioned: while open, ``models.load``'s
    ``load_causal_lm`` and ``load_reward_model`` build every parameter under ``deepspeed.zero.Init``
    (transformers' HfDeepSpeedConfig) and read the checkpoint into the partitions, each rank only its
    own bytes (``engines.zero3_load``), so no rank ever holds a whole copy on the host (8 ranks x 7B
    x 4 B would be 224 GB per node). No-op for other stages and for 8-/4-bit bases, which load
    straight onto the rank's device. Adapters and heads added afterwards are partitioned by
    ``deepspeed.initialize``; the config must be the engine's own (same stage and dtype).
    """
    if eng.zero_stage != 3 or mcfg.quantization != "none":
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Process-global while referenced: every from_pretrained in the block is partitioned.
    live = HfDeepSpeedConfig(ds_config(eng, world_size=dist.world_size(), on_cuda=has_cuda()))
    try:
        with pretrained_reader(partitioned_from_folder):  # the builders read each rank's shards
            yield
    finally:
        unset_hf_deepspeed_config()
        del live
