"""Tiny-model kit: a byte-level BPE tokenizer trained locally and a seeded small Llama.

    stackllama-ds make-tiny --data runs/tiny/data --out runs/tiny/tiny --seed 0

No machine of ours reaches a model hub, so tests and the demo train on a model built here and saved
with ``save_pretrained``; every stage then loads it with ``from_pretrained(path)`` exactly as it
would load a real LLaMA.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from stackllama_ds.config import TinyModelConfig
from stackllama_ds.fsutil import publish_folder

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (as GPT-2/LLaMA-3) with <s>, </s>, <pad>, <unk>; returns a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL["bos"])
    # Like LLaMA: <s> prepended, no </s> appended (packing adds EOS between texts itself).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
        model_max_length=1 << 30,
    )


def build_tiny_llama(cfg: TinyModelConfig, tokenizer, seed: int):
    """A LlamaForCausalLM from config with a seeded random init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(mc)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _texts_from_prepared(data_dir: str | os.PathLike[str]) -> Iterator[str]:
    from stackllama_ds.data.prepare import load_prepared

    dd = load_prepared(data_dir)
    for split in dd.values():
        for row in split:
            yield row["question"]
            yield row["response_j"]
            yield row["response_k"]


def make_tiny(
    data_dir: str | os.PathLike[str], out: str | os.PathLike[str], seed: int = 0, cfg: TinyModelConfig | None = None
) -> Path:
    """Train the tokenizer on the prepared texts, build the model, save both into ``out`` atomically."""
    cfg = cfg or TinyModelConfig()
    out = Path(out)
    tok = train_tokenizer(_texts_from_prepared(data_dir), cfg.vocab_size)
    model = build_tiny_llama(cfg, tok, seed)
    with publish_folder(out) as tmp:
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
    return out
