"""Memory planner: per-GPU (or per-rank RAM) memory of every engine, estimated before a launch.

    stackllama-ds plan configs/tiny.yaml                                  # this machine, the config's launch shape
    stackllama-ds plan configs/stackllama.yaml --gpus-per-node 8 --gpu-mem 80
    stackllama-ds plan configs/tiny.yaml --gpus-per-node 2 --gpu-mem 11   # CPU box: RAM per rank

Without flags the plan is for launch.nnodes x launch.nproc_per_node ranks and the memory of the machine
it runs on: GPU 0's memory when torch sees CUDA, else RAM / nproc_per_node (as the pipeline's gate).
The device (GPU or CPU accounting) follows an NVIDIA driver here; ``--device gpu|cpu`` (or
STACKLLAMA_PLAN_DEVICE) sets it, e.g. to plan a GPU job from a login node without GPUs.

Pure arithmetic on the model shape (``config.json`` of the model folder, or ``model.tiny``), the
dtype, LoRA, an 8-/4-bit base, the ZeRO stage and world size, offload, micro batch and sequence
length. Exit code of ``main``: 0 when every stage fits, 3 when one does not.

Accounting (bytes per parameter P, trainable parameters T, world size W, element size e = 2 for
bf16/fp16 and 4 for fp32):

- weights: P x e; an 8-bit base stores its decoder Linear weights at 1 B (+ a fp32 scale per row),
  a 4-bit (nf4) base at 0.5 B + a fp32 absmax per 64 weights; embeddings, norms and lm_head stay e.
  Frozen engines (PPO's reference and reward) load the same 8-/4-bit base (``models.load``), so
  they are counted quantised too: at 7B an 8-bit reward model is 6.3 GB, not bf16's 12.3 GB.
  ZeRO-3 keeps P/W per GPU plus the gathered working set (about two layers, or the largest
  single module such as the embedding), and when training two more: backward's re-gather and the
  gathered modules' full-size gradients before their reduce-scatter; offload_params moves the
  partition to host memory.
- gradients: T x e in the module; DeepSpeed's optimizer also keeps fp32 gradients (4 B) - in
  mixed precision, and under ZeRO-1/2/3 in any precision (its flat fp32 partitions). ZeRO-0/1: the
  module's gradients are full size; ZeRO-2/3 partition them (/W) plus one reduce bucket (5e7
  elements, or the whole model if smaller). The fp32 gradients are partitioned from ZeRO-1 on.
- optimizer (AdamW): two fp32 moments (8 B) and a fp32 master copy (4 B): 12 B per trainable
  parameter; only plain fp32 ZeRO-0 (torch's optimizer on the module) has no master copy (8 B).
  /W from ZeRO-1 on; offload_optimizer moves them (and the fp32 gradients) to host memory. Full
  fine-tuning in bf16 therefore costs 2 + 2 + 4 + 12 = 20 B/param, of which "weights 2 B + Adam
  8 B" is the StackLLaMA post's 10 B/param.
- activations: per token and layer, with SDPA (no materialised attention matrix),
  e x (7h + 2 kv + 4i) + 8h bytes (norm inputs are upcast to fp32), plus the residual stream;
  the logits of a causal LM cost b x s x V x (e + 12) (fp32 upcast, log-softmax, its gradient).
  Gradient checkpointing keeps one e x h per token and layer and recomputes one layer at a time.
  Eager attention adds 2 x heads x s^2 x e per sequence and layer.
  LoRA adds a = sum over adapted Linears of (e + 1) x in + e x r per token and layer (dropped-out
  input, dropout mask, r-wide activation): tokens x L x a, or tokens x a with checkpointing (only
  the recomputed layer holds them). An 8-bit base under checkpointing also keeps, in every layer,
  the inputs of its int8 matmuls (bitsandbytes holds them outside checkpointing's reach):
  tokens x L x e x (3h + i). See ``lora_activation_bytes``.
- generation (PPO actor): KV cache = batch x (prompt + response) x layers x 2 x kv_heads x
  head_dim x e, plus, under ZeRO-3 with ``ppo.gather_generation``, a full unpartitioned copy of the
  policy to generate from, filled once per rollout by gathering the whole policy at once: a second
  (transient) full copy at e on each rank, (P + LoRA) x e, while the first is held.
- overhead: a fixed runtime cost per process (CUDA context, NCCL buffers and kernels on a GPU;
  the Python/torch/DeepSpeed runtime on CPU, ~1 GB RSS) plus allocator slack on the rest: 10% on a
  GPU, 30% on CPU (glibc keeps freed activation blocks: the launcher asks it to, for speed;
  measured by bench/plan_check.py); on CPU with several ranks each maps every local rank's 66 MiB
  DeepSpeed shared-memory all-reduce workspace.
- padding: RM and reward batches are right-padded and run without a padding mask (SDPA's fused
  causal kernel); PPO's policy batches carry left padding, and on CPU SDPA then takes its math
  path, which materialises the attention matrix.

The engines of one stage live in one process and run one after another, so a stage needs the sum
of every engine's persistent state (weights, gradients, optimizer, generation copy) plus the
largest transient working set (activations, KV cache) of any one engine. GB here means GiB (2^30
bytes, as nvidia-smi counts); ``--gpu-mem`` is in the same unit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from stackllama_ds.config import EngineConfig, LoraConfig, RunConfig, quantized_zero3_engines
from stackllama_ds.run.layout import RunLayout

GiB = float(2**30)
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
REDUCE_BUCKET = 50_000_000  # elements; engines/ds_config.py's reduce_bucket_size
PREFETCH_BUCKET = 50_000_000  # elements; stage3_prefetch_bucket_size
FIXED_OVERHEAD = {"gpu": 1.5 * GiB, "cpu": 1.0 * GiB}
# Allocator slack on top of the live bytes: PyTorch's CUDA caching allocator on a GPU; glibc's heap
# on CPU, which keeps freed activation-sized blocks (set from bench/plan_check.py's measurements).
FRAGMENTATION = {"gpu": 0.10, "cpu": 0.30}
# DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp): every rank maps each local rank's shared
# workspace of 2 x 1 MiB + 2 x 32 MiB, and touches it.
SHM_WORKSPACE = 66 * 2**20


# ------------------------------------------------------------------------------ model shape
@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder that decide its memory."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder Linear, by the module name LoRA targets."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden_size  # two RMSNorm weights

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def n_params(self, head: str = "lm") -> int:
        """All parameters; head "lm" (untied lm_head unless tied), "score" (1 output), "none"."""
        body = self.num_hidden_layers * self.layer_params + self.embed_params + self.hidden_size
        if head == "lm":
            return body + (0 if self.tie_word_embeddings else self.embed_params)
        if head == "score":
            return body + self.hidden_size
        return body

    def lora_params(self, lora: LoraConfig) -> int:
        """Adapter parameters: r x (in + out) per targeted Linear and layer."""
        shapes = self.linear_shapes()
        per_layer = sum(lora.r * (shapes[m][0] + shapes[m][1]) for m in lora.target_modules if m in shapes)
        return self.num_hidden_layers * per_layer


LLAMA_7B = ModelShape(32000, 4096, 11008, 32, 32, 32)


def model_shape(cfg: RunConfig) -> ModelShape:
    """From ``cfg.model.tiny`` for ``name_or_path: tiny``, else the folder's config.json."""
    if cfg.model.name_or_path == "tiny":
        t = cfg.model.tiny
        return ModelShape(t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                          t.num_attention_heads, t.num_key_value_heads)
    from stackllama_ds.models.fetch import KNOWN

    if cfg.model.name_or_path in KNOWN:
        return ModelShape(*KNOWN[cfg.model.name_or_path].shape)
    path = RunLayout(cfg).resolve(cfg.model.name_or_path) / "config.json"
    return shape_from_hf_config(json.loads(path.read_text()))


def shape_from_hf_config(c: dict) -> ModelShape:
    c = c.get("text_config", c)
    heads = c["num_attention_heads"]
    return ModelShape(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c.get("intermediate_size") or 4 * c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


# ------------------------------------------------------------------------------ one engine
@dataclass(frozen=True)
class Workload:
    """What an engine runs: training (micro batch x seq) or frozen forwards, and generation."""

    micro_batch: int  # sequences per forward
    seq_len: int
    head: str = "lm"  # "lm": vocab logits; "score": a scalar per token
    train: bool = True
    gen_batch: int = 0  # > 0: the actor generates this many sequences of seq_len tokens
    gen_copy: bool = False  # ZeRO-3 gather_generation: a full copy of the policy
    attn: str = "sdpa"
    padded: bool = False  # batches carry padding masks (RM pairs, PPO prompts); SFT packing has none
    device: str = "gpu"


@dataclass
class Estimate:
    """Bytes per GPU of one engine; ``host`` is what offload moves to CPU memory."""

    name: str
    params: int
    trainable: int
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0
    gen_copy: float = 0.0
    gen_gather: float = 0.0  # ZeRO-3: the whole policy gathered to refresh gen_copy, once per rollout
    host: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def persistent(self) -> float:
        return self.weights + self.grads + self.optimizer + self.gen_copy

    @property
    def transient(self) -> float:
        # The refresh gather is released before generation starts and training follows generation.
        return max(self.activations + self.kv_cache, self.gen_gather)

    @property
    def total(self) -> float:
        return self.persistent + self.transient


def weight_bytes(shape: ModelShape, head: str, e: int, quant: str) -> float:
    """Bytes of all weights: decoder Linears quantised (1 B or 0.5 B + scales), the rest at e."""
    p = shape.n_params(head)
    lin = shape.num_hidden_layers * shape.layer_linear_params
    if quant == "8bit":
        rows = shape.num_hidden_layers * sum(o for _, o in shape.linear_shapes().values())
        return (p - lin) * e + lin * 1.0 + rows * 4.0
    if quant == "4bit":
        return (p - lin) * e + lin * 0.5 + lin / 64 * 4.0
    return float(p * e)


def activation_bytes(shape: ModelShape, w: Workload, e: int, checkpointing: bool) -> float:
    """Saved activations of one micro batch (training), or the working set of one no-grad forward."""
    h, i, kv, L = shape.hidden_size, shape.intermediate_size, shape.kv_dim, shape.num_hidden_layers
    tokens = w.micro_batch * w.seq_len
    per_layer = e * (7 * h + 2 * kv + 4 * i) + 8 * h  # per token; see the module docstring
    if w.attn == "eager" or (w.padded and w.device == "cpu"):
        # Scores and probabilities materialised: eager attention, or SDPA with a padding mask on CPU
        # (its math fallback; GPU kernels take the mask without materialising).
        per_layer += 2 * shape.num_attention_heads * w.seq_len * e
    vocab = shape.vocab_size if w.head == "lm" else 1
    if not w.train:
        # No graph: about two layers' worth of live tensors, and the logits (+ fp32 log-softmax).
        return tokens * (2 * per_layer + vocab * (e + 8))
    if checkpointing:
        body = tokens * (L * e * h + per_layer)
    else:
        body = tokens * L * per_layer
    return body + tokens * (2 * e * h + vocab * (e + 12))  # embeddings/final norm, logits path


def lora_activation_bytes(shape: ModelShape, lora: LoraConfig, w: Workload, e: int, checkpointing: bool,
                          quant: str) -> float:
    """What training LoRA adapters adds to ``activation_bytes`` for one micro batch (tokens = b x s).

    Each adapted Linear saves its dropped-out input (e B) and the dropout mask (1 B) per input
    feature, and its r-wide adapter activation (e B):

        a = sum_{m in targets} (e + 1) x in_m + e x r        per token and layer
        lora = tokens x L x a    without checkpointing
        lora = tokens x a        with checkpointing: only the layer being recomputed holds them (the
                                 L x e x h layer boundaries are already in ``activation_bytes``)

    An 8-bit base under (non-reentrant) checkpointing: bitsandbytes' int8 matmul (MatMul8bitLt on a
    GPU, MatMul8bitFp on CPU) keeps its input A as a ctx attribute (``ctx.tensors = (CAt, subA, A)``),
    not through save_for_backward, so checkpointing's saved-tensor hooks never drop it and every
    layer's graph holds the inputs of its 8-bit Linears. They share four tensors: the attention norm
    output (q, k, v), the attention output (o), the MLP norm output (gate, up), act(gate) x up (down):

        int8 = tokens x L x e x (3h + i)

    (CAt is None for frozen weights; subA, the few outlier columns, is left out.) Without
    checkpointing these inputs are among the layer's activations already; a 4-bit matmul keeps only
    its (resident) weight.
    """
    tokens = w.micro_batch * w.seq_len
    L, shapes = shape.num_hidden_layers, shape.linear_shapes()
    a = sum((e + 1) * shapes[m][0] + e * lora.r for m in lora.target_modules if m in shapes)
    out = tokens * a if checkpointing else tokens * L * a  # tokens x a  |  tokens x L x a
    if checkpointing and quant == "8bit":
        out += tokens * L * e * (3 * shape.hidden_size + shape.intermediate_size)  # tokens x L x e x (3h + i)
    return out


def _place_weights(est: Estimate, full_w: float, shape: ModelShape, eng: EngineConfig, e: int, W: int, z: int,
                   trainable: bool) -> float:
    """Set ``est.weights`` (and ``est.host`` with offloaded params) for ``full_w`` bytes of weights
    under ZeRO stage ``z`` on ``W`` ranks. Returns the full-size gradients ZeRO-3's backward adds
    to the gradients (0 otherwise)."""
    if z != 3:
        est.weights = full_w
        return 0.0
    layer = shape.layer_params * e
    # Gathered while a forward runs: up to the prefetch bucket, at least two layers or the
    # largest module, at most the whole model.
    working = min(full_w, max(2 * layer, shape.embed_params * e, PREFETCH_BUCKET * e))
    part = full_w / W
    if eng.offload_params:
        est.host += part
        est.weights = working
        est.notes.append("params offloaded")
    else:
        est.weights = part + working
    if not trainable:
        return 0.0
    # Backward re-gathers the modules while the forward's gathered copies are still held by
    # the allocator (CUDA cache / CPU heap), and each gathered module's full-size gradient
    # exists until its reduce-scatter: two more working sets.
    est.weights += working
    return working


def _place_grads_and_optimizer(est: Estimate, t: int, e: int, W: int, z: int, master: bool, offload: bool,
                               z3_full_grads: float) -> None:
    """Set ``est.grads`` and ``est.optimizer`` (or ``est.host`` with an offloaded optimizer) for ``t``
    trainable parameters under ZeRO stage ``z`` on ``W`` ranks."""
    # gradients: module copy at e (+ fp32 copy for the optimizer in mixed precision)
    module_g = t * e
    fp32_g = t * 4 if master else 0.0
    if z >= 2:
        module_g = module_g / W + REDUCE_BUCKET * e  # the contiguous bucket is allocated whole
    if z >= 1:
        fp32_g /= W
    # optimizer: AdamW moments (8 B) + fp32 master (4 B) in mixed precision
    opt = t * (12 if master else 8)
    if z >= 1:
        opt /= W
    if offload:
        est.host += opt + fp32_g
        est.notes.append("optimizer offloaded")
        opt, fp32_g = 0.0, 0.0
    est.grads = module_g + fp32_g + z3_full_grads
    est.optimizer = opt


def engine_estimate(
    name: str,
    shape: ModelShape,
    eng: EngineConfig,
    world: int,
    work: Workload,
    *,
    lora: LoraConfig | None = None,
    quant: str = "none",
    trainable: bool = True,
    extra_trainable: int = 0,
    device: str = "gpu",
) -> Estimate:
    """Per-GPU bytes of one engine (see the module docstring for the accounting)."""
    e = ELEM[eng.dtype]
    mixed = eng.dtype != "fp32"
    master = mixed or (trainable and eng.zero_stage >= 1)  # DeepSpeed's fp32 copy and fp32 gradients
    use_lora = lora is not None and lora.enabled
    # A frozen engine (PPO's reference, reward) loads the quantised base as it is; a trainable one
    # only trains it through LoRA (validation).
    quant = quant if use_lora or not trainable else "none"
    p = shape.n_params(work.head) + extra_trainable
    t = 0
    if trainable:
        t = (shape.lora_params(lora) if use_lora else p - extra_trainable) + extra_trainable
        if use_lora and work.head == "score":
            t += shape.hidden_size  # peft trains (and saves) the score head
    est = Estimate(name, p + (t if use_lora else 0), t)
    W = max(1, world)
    z = eng.zero_stage if trainable else (3 if eng.zero_stage == 3 else 0)

    # weights (frozen base + trainable adapters at e)
    full_w = weight_bytes(shape, work.head, e, quant) + (t * e if use_lora else extra_trainable * e)
    z3_full_grads = _place_weights(est, full_w, shape, eng, e, W, z, trainable)
    if t:
        _place_grads_and_optimizer(est, t, e, W, z, master, eng.offload_optimizer, z3_full_grads)

    ckpt = eng.gradient_checkpointing and work.train
    est.activations = activation_bytes(shape, work, e, ckpt)
    if use_lora and work.train and t:
        est.activations += lora_activation_bytes(shape, lora, work, e, ckpt, quant)
    if work.gen_batch:
        est.kv_cache = work.gen_batch * work.seq_len * shape.num_hidden_layers * 2 * shape.kv_dim * e
        est.kv_cache += work.gen_batch * shape.vocab_size * 4 * 2  # per-step logits / probabilities
        if work.gen_copy:
            lora_b = shape.lora_params(lora) * e if use_lora else 0
            est.gen_copy = weight_bytes(shape, "lm", e, quant) + lora_b
            # GenerationCopy.refresh gathers every policy parameter in one GatheredParameters: the
            # whole policy at e on each rank beside the copy, (P_lm + LoRA) x e.
            est.gen_gather = shape.n_params("lm") * e + lora_b
    if device == "cpu" and est.host:
        # Offload on a CPU box moves nothing anywhere: it is the same RAM.
        est.weights, est.optimizer = est.weights + est.host, est.optimizer
        est.notes.append("(CPU: offloaded bytes counted in RAM)")
        est.host = 0.0
    return est


# ------------------------------------------------------------------------------ stages
@dataclass
class StagePlan:
    stage: str
    engines: list[Estimate]
    overhead: float
    budget: float
    device: str

    @property
    def total(self) -> float:
        return (sum(e.persistent for e in self.engines) + max((e.transient for e in self.engines), default=0.0)
                + self.overhead)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def overhead_bytes(rest: float, device: str, world: int = 1) -> float:
    comm = SHM_WORKSPACE * world if device == "cpu" and world > 1 else 0.0
    return FIXED_OVERHEAD[device] + FRAGMENTATION[device] * rest + comm


def _finish(stage: str, engines: list[Estimate], budget: float, device: str, world: int = 1) -> StagePlan:
    rest = sum(e.persistent for e in engines) + max((e.transient for e in engines), default=0.0)
    return StagePlan(stage, engines, overhead_bytes(rest, device, world), budget, device)


def plan_sft(cfg: RunConfig, shape: ModelShape, world: int, budget: float, device: str = "gpu") -> StagePlan:
    s = cfg.sft
    w = Workload(s.engine.micro_batch_size, s.seq_length, "lm", attn=cfg.model.attn_implementation,
                 padded=not s.packing, device=device)
    est = engine_estimate("sft model", shape, s.engine, world, w, lora=s.lora, quant=cfg.model.quantization,
                          device=device)
    return _finish("sft", [est], budget, device, world)


def plan_rm(cfg: RunConfig, shape: ModelShape, world: int, budget: float, device: str = "gpu") -> StagePlan:
    r = cfg.rm
    # One forward over [chosen..., rejected...]: 2 x micro batch sequences of up to max_length,
    # right-padded and run without a padding mask (stages/rm.py): SDPA's fused causal path.
    w = Workload(2 * r.engine.micro_batch_size, r.max_length, "score", attn=cfg.model.attn_implementation,
                 device=device)
    est = engine_estimate("reward model", shape, r.engine, world, w, lora=r.lora, quant=cfg.model.quantization,
                          device=device)
    return _finish("rm", [est], budget, device, world)


def plan_ppo(cfg: RunConfig, shape: ModelShape, world: int, budget: float, device: str = "gpu") -> StagePlan:
    p = cfg.ppo
    q, attn = cfg.model.quantization, cfg.model.attn_implementation
    seq = p.max_prompt_length + p.response_max_length
    gen_copy = p.actor.zero_stage == 3 and p.gather_generation
    # Actor: policy + value head; trains minibatches, generates the rollout batch.
    actor = engine_estimate(
        "actor", shape, p.actor, world,
        Workload(p.mini_batch_size, seq, "lm", gen_batch=p.batch_size, gen_copy=gen_copy, attn=attn, padded=True,
                 device=device),
        lora=p.lora, quant=q, extra_trainable=shape.hidden_size + 1, device=device)
    engines = [actor]
    if p.separate_critic:
        engines.append(engine_estimate("critic", shape, p.critic, world, Workload(p.mini_batch_size, seq, "score",
                                       attn=attn, padded=True, device=device), device=device))
    if not p.lora.enabled:
        engines.append(engine_estimate("reference", shape, p.reference, world,
                                       Workload(p.forward_batch_size, seq, "lm", train=False, attn=attn,
                                                padded=True, device=device),
                                       quant=q, trainable=False, device=device))
    if p.rule_reward is None:
        # The reward engine scores the whole rollout batch in one forward (right-padded, no mask).
        engines.append(engine_estimate("reward", shape, p.reward, world,
                                       Workload(p.batch_size, seq, "score", train=False, attn=attn,
                                                device=device),
                                       quant=q, trainable=False, device=device))
    return _finish("ppo", engines, budget, device, world)


PLANNERS = {"sft": plan_sft, "rm": plan_rm, "ppo": plan_ppo}


def detect_device() -> str:
    """"gpu" when an NVIDIA driver is present (no torch import), else "cpu" (plan against RAM)."""
    forced = os.environ.get("STACKLLAMA_PLAN_DEVICE")
    if forced in ("gpu", "cpu"):
        return forced
    return "gpu" if Path("/proc/driver/nvidia/version").exists() else "cpu"


@dataclass(frozen=True)
class Target:
    """What a plan is for: ranks per node, GB per rank (GPU memory, or RAM on CPU), and whence."""

    gpus_per_node: int
    gpu_mem: float
    device: str
    shape_from: str
    mem_from: str


def ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


def cuda_mem_gb() -> tuple[float, str] | None:
    """(GB, name) of CUDA device 0, or None when torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.total_memory / GiB, props.name


def resolve_target(cfg: RunConfig, gpus_per_node: int | None = None, gpu_mem: float | None = None,
                   device: str | None = None, forced: bool = False) -> Target:
    """Fill what the caller left None: ranks per node from the config, memory from this machine.
    ``forced``: the user chose ``device`` (``--device``), so a GPU plan never falls back to RAM."""
    forced = forced or os.environ.get("STACKLLAMA_PLAN_DEVICE") in ("gpu", "cpu")
    device = device or detect_device()
    gpn = gpus_per_node if gpus_per_node is not None else cfg.launch.nproc_per_node
    shape_from = "--gpus-per-node" if gpus_per_node is not None else "launch.nproc_per_node"
    if gpu_mem is not None:
        return Target(gpn, float(gpu_mem), device, shape_from, "--gpu-mem")
    if device == "gpu":
        cuda = cuda_mem_gb()  # torch only here: an NVIDIA driver said there may be a GPU
        if cuda is not None:
            return Target(gpn, cuda[0], "gpu", shape_from, f"GPU 0 of this machine ({cuda[1]})")
        if forced:
            raise ValueError("planning for GPUs (--device gpu or STACKLLAMA_PLAN_DEVICE=gpu) but torch sees no CUDA "
                             "device to measure: pass --gpu-mem")
        device = "cpu"  # a driver without a usable CUDA torch: the ranks would run on CPU
    ram = ram_gb()
    return Target(gpn, ram / gpn, device, shape_from, f"this machine's RAM, {ram:.1f} GB / {gpn} ranks per node")


def plan_all(cfg: RunConfig, gpus_per_node: int, gpu_mem: float, device: str | None = None) -> list[StagePlan]:
    device = device or detect_device()
    shape = model_shape(cfg)
    world = cfg.launch.nnodes * gpus_per_node
    return [fn(cfg, shape, world, gpu_mem * GiB, device) for fn in PLANNERS.values()]


# ------------------------------------------------------------------------------ suggestions
def _variants(cfg: RunConfig, stage: str) -> list[tuple[str, RunConfig]]:
    """Config changes to try, cheapest first, each applied to the stage's engines."""

    def with_engines(label: str, **kw) -> tuple[str, RunConfig]:
        c = cfg.model_copy(deep=True)
        if stage == "ppo":
            c.ppo.actor = replace_engine(c.ppo.actor, kw)
            c.ppo.critic = replace_engine(c.ppo.critic, kw)
            if "zero_stage" in kw:
                c.ppo.reference = replace_engine(c.ppo.reference, {"zero_stage": kw["zero_stage"]})
                c.ppo.reward = replace_engine(c.ppo.reward, {"zero_stage": kw["zero_stage"]})
        else:
            sc = getattr(c, stage)
            sc.engine = replace_engine(sc.engine, kw)
        return label, c

    def lora_on(quant: str, label: str) -> tuple[str, RunConfig]:
        c = cfg.model_copy(deep=True)
        getattr(c, stage).lora.enabled = True
        c.model.quantization = quant
        return label, c

    eng = cfg.ppo.actor if stage == "ppo" else getattr(cfg, stage).engine
    out = []
    if not eng.gradient_checkpointing:
        out.append(with_engines(f"{stage}: gradient_checkpointing: true", gradient_checkpointing=True))
    if stage != "ppo" and eng.micro_batch_size > 1:
        mb = max(1, eng.micro_batch_size // 2)
        out.append(with_engines(f"{stage}.engine.micro_batch_size: {mb} (raise gradient accumulation)",
                                micro_batch_size=mb))
    if eng.zero_stage < 3:
        out.append(with_engines(f"{stage}: zero_stage: 3", zero_stage=3))
    if not eng.offload_optimizer and eng.zero_stage >= 1 or eng.zero_stage < 3:
        out.append(with_engines(f"{stage}: zero_stage: 3 with offload_optimizer: true", zero_stage=3,
                                offload_optimizer=True))
    out.append(with_engines(f"{stage}: zero_stage: 3 with offload_optimizer and offload_params", zero_stage=3,
                            offload_optimizer=True, offload_params=True))
    if not getattr(cfg, stage).lora.enabled:
        out.append(lora_on(cfg.model.quantization, f"{stage}.lora.enabled: true"))
    if cfg.model.quantization == "none":
        out.append(lora_on("8bit", f"{stage}.lora.enabled: true with model.quantization: 8bit"))
    if cfg.model.quantization != "4bit":
        out.append(lora_on("4bit", f"{stage}.lora.enabled: true with model.quantization: 4bit (ZeRO-2)"))
    return [(label, c) for label, c in out if not quantized_zero3_engines(c)]  # validation rejects those


def replace_engine(eng: EngineConfig, kw: dict) -> EngineConfig:
    d = eng.model_dump() | kw
    if d.get("offload_params") and d["zero_stage"] != 3:
        d["offload_params"] = False
    return EngineConfig(**d)


def suggestions(cfg: RunConfig, stage: str, gpus_per_node: int, gpu_mem: float, device: str, n: int = 3) -> list[str]:
    shape = model_shape(cfg)
    world = cfg.launch.nnodes * gpus_per_node
    out = []
    for label, c in _variants(cfg, stage):
        sp = PLANNERS[stage](c, shape, world, gpu_mem * GiB, device)
        if sp.fits:
            out.append(f"{label} (-> {sp.total / GiB:.1f} GB)")
            if len(out) >= n:
                break
    if not out:
        out.append(f"more GPUs (world size {world} now) or a smaller model: none of the single changes fits")
    return out


# ------------------------------------------------------------------------------ output
def _gb(x: float) -> str:
    return f"{x / GiB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def format_plan(sp: StagePlan) -> str:
    unit = "GB per GPU" if sp.device == "gpu" else "GB RAM per rank"
    hdr = ["engine", "params", "trainable", "weights", "grads", "optimizer", "activations", "kv cache",
           "gen copy", "gen gather", "total", "host (offload)"]
    rows = [[e.name, _count(e.params), _count(e.trainable), _gb(e.weights), _gb(e.grads), _gb(e.optimizer),
             _gb(e.activations), _gb(e.kv_cache), _gb(e.gen_copy), _gb(e.gen_gather), _gb(e.total), _gb(e.host)]
            for e in sp.engines]
    rows.append(["overhead", "", "", "", "", "", "", "", "", "", _gb(sp.overhead), ""])
    rows.append(["stage peak", "", "", "", "", "", "", "", "", "", _gb(sp.total), ""])
    w = [max(len(str(r[i])) for r in [hdr, *rows]) for i in range(len(hdr))]
    lines = [f"{sp.stage.upper()} ({unit}; stage peak = persistent state of every engine + the largest "
             f"transient + overhead)"]
    lines.append("  " + "  ".join(str(c).rjust(w[i]) for i, c in enumerate(hdr)))
    for r in rows:
        lines.append("  " + "  ".join(str(c).rjust(w[i]) for i, c in enumerate(r)))
    notes = sorted({n for e in sp.engines for n in e.notes})
    if notes:
        lines.append("  notes: " + "; ".join(notes))
    return "\n".join(lines)


def verdict(sp: StagePlan, cfg: RunConfig, gpus_per_node: int, gpu_mem: float) -> str:
    if sp.fits:
        return f"{sp.stage}: fits with {(sp.budget - sp.total) / GiB:.1f} GB to spare ({sp.total / GiB:.1f} of {gpu_mem:.4g} GB)"
    tips = suggestions(cfg, sp.stage, gpus_per_node, gpu_mem, sp.device)
    return (f"{sp.stage}: does not fit: needs {sp.total / GiB:.1f} GB of {gpu_mem:.4g} GB; try "
            + "; or ".join(tips))


def fits(cfg: RunConfig, gpus_per_node: int, gpu_mem: float, device: str | None = None) -> tuple[bool, str]:
    """(every stage fits, one verdict line per stage) - for the pipeline and Slurm scripts."""
    plans = plan_all(cfg, gpus_per_node, gpu_mem, device)
    return all(sp.fits for sp in plans), "\n".join(verdict(sp, cfg, gpus_per_node, gpu_mem) for sp in plans)


def main(cfg: RunConfig, gpus_per_node: int | None = None, gpu_mem: float | None = None,
         device: str | None = None, forced: bool = False) -> int:
    """Print a table per stage and a verdict; 0 when everything fits, 3 when something does not.

    ``gpus_per_node`` / ``gpu_mem`` left None: the config's launch shape, this machine's memory.
    """
    tg = resolve_target(cfg, gpus_per_node, gpu_mem, device, forced)
    gpus_per_node, gpu_mem, device = tg.gpus_per_node, tg.gpu_mem, tg.device
    shape = model_shape(cfg)
    world = cfg.launch.nnodes * gpus_per_node
    where = "GPU" if device == "gpu" else "rank (CPU: planned against RAM)"
    print(f"model: {_count(shape.n_params())} parameters (hidden {shape.hidden_size}, {shape.num_hidden_layers} "
          f"layers, vocab {shape.vocab_size}); world size {world} ({cfg.launch.nnodes} node(s) x {gpus_per_node}); "
          f"{gpu_mem:.4g} GB per {where}")
    print(f"planned for: {cfg.launch.nnodes} node(s) (launch.nnodes) x {gpus_per_node} ranks ({tg.shape_from}); "
          f"{gpu_mem:.4g} GB per rank ({tg.mem_from})")
    plans = plan_all(cfg, gpus_per_node, gpu_mem, device)
    for sp in plans:
        print()
        print(format_plan(sp))
    print()
    for sp in plans:
        print(verdict(sp, cfg, gpus_per_node, gpu_mem))
    return 0 if all(sp.fits for sp in plans) else 3
