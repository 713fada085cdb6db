"""Load models and tokenizers with ``from_pretrained(path)``: LoRA (peft), 8-/4-bit bases, heads.

The same code loads the tiny test model and a real LLaMA folder on a cluster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stackllama_ds.config import LoraConfig, ModelConfig
from stackllama_ds.hardware import cuda_device_index, torch_dtypes

DTYPES = torch_dtypes()


def _quiet() -> None:
    """No per-model "Loading weights" bars: stages load several models and log their own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(path: str | os.PathLike[str], padding_side: str = "left"):
    """A fast tokenizer with a pad token (LLaMA has none: fall back to EOS, as StackLLaMA did)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), padding_side=padding_side)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# Builds a base that is not quantised in place of from_pretrained while set (engines.load.zero3_init
# sets its partitioned ZeRO-3 reader): models/ itself needs no DeepSpeed. Called as
# read(auto_cls, path, dtype=, attn_implementation=, **config_kwargs); None falls back to from_pretrained.
PretrainedReader = Callable[..., nn.Module | None]
_reader: PretrainedReader | None = None


@contextmanager
def pretrained_reader(read: PretrainedReader) -> Iterator[None]:
    """While open, ``load_causal_lm`` and ``load_reward_model`` build a base that is not quantised
    with ``read``."""
    global _reader
    outer, _reader = _reader, read
    try:
        yield
    finally:
        _reader = outer


def _from_pretrained(auto_cls, path: str | os.PathLike[str], mcfg: ModelConfig, td: torch.dtype,
                     **config_kwargs) -> nn.Module:
    if mcfg.quantization == "none" and _reader is not None:  # inside zero3_init: each rank reads its shards
        model = _reader(auto_cls, path, dtype=td, attn_implementation=mcfg.attn_implementation, **config_kwargs)
        if model is not None:
            return model
    return auto_cls.from_pretrained(str(path), dtype=td, attn_implementation=mcfg.attn_implementation,
                                    **config_kwargs, **_quant_kwargs(mcfg, td))


def _quant_kwargs(mcfg: ModelConfig, dtype: torch.dtype) -> dict:
    if mcfg.quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if mcfg.quantization == "8bit":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    dev = "cpu"
    if torch.cuda.is_available():  # the rank's own GPU, as engines.dist places everything else
        dev = f"cuda:{cuda_device_index(int(os.environ.get('LOCAL_RANK', '0')), torch.cuda.device_count())}"
    return {"quantization_config": q, "device_map": {"": dev}}


def _no_cpu_repack(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPU (ZeRO-3 then corrupts them).

    On a CPU with avx512_bf16, ``Linear4bit.forward`` in eval mode without grad rewrites
    ``weight.data`` into a CPU layout and flags ``quant_state.packing_format_for_cpu``. ZeRO-3 keeps
    the original bytes in its partitions and re-gathers those, while the flag stays set: every later
    forward reads the weights in the wrong layout (losses diverge from ZeRO-2, or an assertion
    "N must be divisible by block_n"). Without the repack ZeRO-2 and ZeRO-3 agree exactly.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def apply_lora(model: nn.Module, lora: LoraConfig, task_type: str, quantized: bool) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters; for SEQ_CLS peft also trains (and saves) the score head."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    pc = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        bias="none",
    )
    return get_peft_model(model, pc)


def contiguous_head_input(model: nn.Module) -> nn.Module:
    """Make the LM head's input contiguous before its matmul; returns ``model``.

    The heads run on the last positions only (``logits_to_keep``, ``keep``): a strided slice of the
    hidden states. torch's matmul does not fold a strided 3-D input against a weight that needs no
    grad (a frozen or LoRA base) into one mm: it runs a bmm over the weight expanded and copied once
    per row (B x V x H). Measured on SmolLM2-135M, bf16, 2 CPU threads: 0.21 s instead of 0.01 s
    per (2, 37) head call, ~1 s per prefill of a batch of 8, ~3 s of a LoRA PPO step.
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_contiguous_input", False):
        head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
        head._contiguous_input = True
    return model


def load_causal_lm(
    path: str | os.PathLike[str],
    mcfg: ModelConfig,
    *,
    dtype: str = "fp32",
    lora: LoraConfig | None = None,
    trainable: bool = True,
) -> nn.Module:
    """AutoModelForCausalLM from a local folder, optionally quantised and wrapped in LoRA."""
    from transformers import AutoModelForCausalLM

    _quiet()
    model = _from_pretrained(AutoModelForCausalLM, path, mcfg, DTYPES[dtype])
    if mcfg.quantization == "4bit":
        _no_cpu_repack(model)
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, "CAUSAL_LM", mcfg.quantization != "none")
    elif not trainable:
        model.requires_grad_(False)
    return contiguous_head_input(model)


def empty_causal_lm(path: str | os.PathLike[str], mcfg: ModelConfig, *, dtype: str, device: torch.device,
                    lora: LoraConfig | None = None) -> nn.Module:
    """The structure of ``load_causal_lm(path, ...)`` with uninitialised storage on ``device``: built
    on the meta device, so the checkpoint is never read and the host never holds a copy (for
    ``GenerationCopy``, which overwrites every parameter and buffer from the actor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype],
                                                 attn_implementation=mcfg.attn_implementation)
        if lora is not None and lora.enabled:
            model = apply_lora(model, lora, "CAUSAL_LM", quantized=False)
    model = model.to_empty(device=device)
    # to_empty gives each module's parameter its own new storage, untying a tied head from the
    # embeddings (SmolLM2): re-tie, so the copy has the actor's parameters, name for name.
    (model.get_base_model() if hasattr(model, "get_base_model") else model).tie_weights()
    return contiguous_head_input(model)


class Fp32Score(nn.Linear):
    """A reward model's ``score`` layer that computes in fp32 whatever dtype the model runs in.

    DeepSpeed casts the module to bf16/fp16 (its fp32 master weights live in the optimizer); a
    reward is a small difference of two large dot products, so the head's matmul is done on fp32
    copies of the hidden state and the weight. Same parameters and state-dict keys as nn.Linear.
    ``fp32_weight``: the fp32 weight of the last forward with grad, in the autograd graph (ODIN's
    orthogonality term reads it; under ZeRO-3 the parameter itself is only gathered in forward).
    """

    fp32_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (K, H), always a copy: ZeRO-3 empties the parameter itself after the forward
        w = self.weight.to(torch.float32, copy=True)
        self.__dict__["fp32_weight"] = w if torch.is_grad_enabled() else None  # not Module.__setattr__: no param
        return F.linear(x.float(), w, None if self.bias is None else self.bias.float())  # (..., K) fp32


def fp32_score(model: nn.Module) -> nn.Module:
    """Make a sequence classifier's plain ``score`` Linear an ``Fp32Score`` in place (before peft
    wraps it: its trainable copy keeps the class); returns ``model``."""
    score = getattr(model, "score", None)
    if type(score) is nn.Linear:  # not a quantised layer
        score.__class__ = Fp32Score
    return model


def score_weight(model: nn.Module) -> torch.Tensor:
    """The (K, H) fp32 weight the reward head used in its last forward with grad (plain or peft model)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    # peft's ModulesToSaveWrapper holds the frozen original and the trained copy: the copy ran
    used = [m.fp32_weight for m in lm.score.modules() if isinstance(m, Fp32Score) and m.fp32_weight is not None]
    if len(used) != 1:
        raise RuntimeError(f"expected one Fp32Score head run with grad, found {len(used)}")
    return used[0]


HEAD_LABELS = ("quality", "length")  # score rows: ODIN's quality head (what PPO reads), length head


def _is_seq_cls_folder(path: str | os.PathLike[str]) -> bool:
    """An exported reward model (its score head saved), not a causal LM to start one from."""
    cfg = Path(path) / "config.json"
    archs = (json.loads(cfg.read_text()).get("architectures") or []) if cfg.exists() else []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_model(
    path: str | os.PathLike[str],
    mcfg: ModelConfig,
    *,
    pad_token_id: int,
    dtype: str = "fp32",
    lora: LoraConfig | None = None,
    num_labels: int | None = None,
) -> nn.Module:
    """AutoModelForSequenceClassification; the score is read at the last non-pad token, in fp32.

    ``num_labels``: 1, or 2 for ODIN's quality and length heads (``HEAD_LABELS``); None takes an
    exported reward model's own (a sequence-classification folder), else 1. Column 0 is always the
    reward PPO, eval and ask read.
    """
    from transformers import AutoModelForSequenceClassification

    _quiet()
    if num_labels is None and _is_seq_cls_folder(path):
        labels = {}  # the folder's config: its num_labels and label names
    elif (num_labels or 1) == 1:
        labels = {"num_labels": 1}
    elif num_labels == len(HEAD_LABELS):
        labels = {"id2label": dict(enumerate(HEAD_LABELS)), "label2id": {n: i for i, n in enumerate(HEAD_LABELS)}}
    else:
        raise ValueError(f"num_labels must be 1 or 2 (quality, length), got {num_labels}")
    model = _from_pretrained(AutoModelForSequenceClassification, path, mcfg, DTYPES[dtype], **labels)
    model.config.pad_token_id = pad_token_id
    fp32_score(model)
    if mcfg.quantization == "4bit":
        _no_cpu_repack(model)
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, "SEQ_CLS", mcfg.quantization != "none")
    return model


def enable_activation_checkpointing(model: nn.Module, kwargs: dict | None = None) -> None:
    """Recompute each decoder layer's activations in the backward pass (HF or peft-wrapped model).

    Non-reentrant by default. Frozen embeddings (LoRA, quantised bases) give inputs that do not
    require grad; their output is made to, so a checkpointed segment always has a grad path
    (reentrant checkpointing needs it; transformers 5 does it itself for ``input_ids`` models).
    """
    kwargs = {"use_reentrant": False} if kwargs is None else kwargs
    lm, _, _ = hf_parts(model)
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lm is not model and not getattr(lm, "_require_grads_hooks", None):  # peft
        lm.enable_input_require_grads()
    lm.config.use_cache = False


def hf_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(model, decoder body, lm head) of a plain or peft-wrapped HF model (head None without one)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(lm, lm.base_model_prefix)
    return lm, body, lm.get_output_embeddings()


def tail_hidden(body: nn.Module, input_ids, attention_mask, position_ids, keep: int | None) -> torch.Tensor:
    """Last hidden states (B, T, H) of a decoder body, or of its last ``keep`` positions only."""
    h = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return h.last_hidden_state if keep is None else h.last_hidden_state[:, -keep:]


class ActorWithValueHead(nn.Module):
    """Policy plus a scalar value per token on the last hidden state (StackLLaMA's value head).

    ``forward`` returns (logits (B, T, V), values (B, T)). The policy may be peft-wrapped; then
    ``with actor.policy.disable_adapter():`` runs the frozen base, i.e. the reference policy.
    """

    def __init__(self, policy: nn.Module, dropout: float = 0.1):
        super().__init__()
        self.policy = policy
        _, _, head = hf_parts(policy)
        # in_features, not weight.shape: a ZeRO-3 partitioned weight has shape (0,)
        hidden = getattr(head, "in_features", None) or policy.config.hidden_size
        self.v_dropout = nn.Dropout(dropout)
        self.v_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.v_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.v_head.bias)

    @property
    def config(self):
        return self.policy.config

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        enable_activation_checkpointing(self.policy, activation_checkpointing_kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        keep: int | None = None,
    ):
        """``keep``: heads on the last ``keep`` positions only (PPO needs the response's)."""
        _, body, head = hf_parts(self.policy)
        hidden = tail_hidden(body, input_ids, attention_mask, position_ids, keep)  # (B, T, H)
        logits = head(hidden)  # (B, T, V)
        values = self.v_head(self.v_dropout(hidden)).squeeze(-1).float()  # (B, T)
        return logits, values


def value_head_path(model_dir: str | os.PathLike[str]) -> Path:
    return Path(model_dir) / "value_head.safetensors"


class TokenValueModel(nn.Module):
    """A separate critic (DeepSpeed-Chat style): a sequence classifier's score head on every token.

    Initialised from the reward model (its trained ``score`` head) or from SFT weights (a fresh
    head). ``forward`` returns values (B, T).
    """

    def __init__(self, seq_cls: nn.Module):
        super().__init__()
        self.model = seq_cls

    @property
    def config(self):
        return self.model.config

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        enable_activation_checkpointing(self.model, activation_checkpointing_kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        keep: int | None = None,
    ):
        lm, body, _ = hf_parts(self.model)
        # column 0: a two-head (ODIN) reward model's quality head; the length head gets no gradient
        return lm.score(tail_hidden(body, input_ids, attention_mask, position_ids, keep))[..., 0].float()  # (B, T)
