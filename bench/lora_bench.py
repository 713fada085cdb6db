"""LoRA on SmolLM2-135M: our SFT / RM / PPO loops vs TRL, side by side in one run (issue 16).

    python bench/lora_bench.py --stage sft            # tokens/s vs TRL 1.16 SFTTrainer (packing)
    python bench/lora_bench.py --stage rm             # pairs/s vs TRL 1.16 RewardTrainer
    python bench/lora_bench.py --stage ppo            # step time vs TRL 0.11.4 PPOTrainer
    python bench/lora_bench.py --stage sft-scaling    # ours: 1 rank x 1 core, 1 rank x 2 cores, 2 ranks x 1 core
    python bench/lora_bench.py --stage ppo-scaling
    python bench/lora_bench.py --stage sft --rounds 3 --steps 8 --peer-base fp32

Model: SmolLM2-135M-Instruct (``stackllama-ds fetch-model smollm2-135m``), data: the beer dump in
data/ prepared with configs/smollm2.yaml's splits (bench/out/smol/data; rm_eval cut to 2%, see
``ensure_data``). Our side is the real stage run by the CLI from configs/smollm2.yaml with only the
benchmark's overrides (1 rank, the steps, no mid-run eval or checkpoint, ZeRO-0 on 1 rank: ZeRO-1/2
partition nothing there; RM ``overlength: filter`` so both sides train on the same pairs; PPO's
response length fixed). LoRA exactly as that file: SFT/PPO r16 alpha 32 dropout 0.05 on
q_proj,v_proj, RM r8 alpha 32 dropout 0.1 SEQ_CLS with a trained score head, PPO's reference = the
adapter disabled. The peers get the same LoRA as a ``peft.LoraConfig``, the same sequence length,
batch, optimizer settings and precision (``dtype: auto``: bf16 where the CPU has avx512_bf16/AMX);
the peer's frozen base is loaded in that dtype (``--peer-base fp32``: TRL's default for this fp32
checkpoint, autocasting every matmul); TRL 1.16's default gradient checkpointing is off, as ours.

Timing on a shared machine: both sides of a round start at once and take turns step by step
(bench/turns.py; our stage is gated through bench/turnhook/sitecustomize.py, the peers through a
callback), so each step runs alone next to the other side's same step and their ratio is taken
under the same load; the side that goes first alternates by round. A step is timed from its start
to its end (waiting excluded); the first ``--warmup`` steps are dropped, and for SFT and RM the
last (our loop evaluates in it). Peak RSS is the largest process's (per rank). The load average
at each round's start is printed.

FLOPs of a step (``fwd_flops``, ``train_flops``), for a sequence of n tokens of which h go through
the LM head, on a Llama with L layers, hidden H, attention width d = heads x head_dim, KV width
d_kv, MLP width I, vocab V, LoRA rank r on modules (d_in -> d_out):
    N_body = L * (H*d + 2*H*d_kv + d*H + 3*H*I)          decoder matmul weights
    N_lora = L * sum_modules r * (d_in + d_out)
    A(n)   = 4 * L * d * n(n+1)/2                        QK^T and PV over the causal pairs
    forward           F(n, h) = 2*N_body*n + 2*N_lora*n + A(n) + 2*V*H*h
    LoRA train step   T(n, h) = 4*N_body*n + 6*N_lora*n + 3*A(n) + 4*V*H*h
The frozen base's backward computes input gradients only (one matmul per weight, as many FLOPs as
the forward; no weight gradients); LoRA's A and B need input and weight gradients (2x their
forward); attention's backward is 4 matmuls to the forward's 2. Heads of one output (value, score)
are left out. SFT: T(seq, seq) per packed row. RM: T(n_c, 0) + T(n_r, 0) per pair, real tokens only
(padding is not useful work). PPO per rollout of prompt p and response R, n = p + R:
F(n, R) generate + F(n, 0) score (question + response ~ n tokens, no LoRA) + F(n, R) actor and
F(n, R) reference (no LoRA) log-probs + epochs x T(n, R) training. Both sides get the same FLOP
count (same work), so the achieved FLOP/s compare as the speeds do.

Ceiling: a matmul rate measured with torch at the step's shapes, in the run's dtype, on the threads
one rank uses: F.linear of (rows x d_in) by every (d_in -> d_out) of the model (q, k, v, o, gate,
up, down, LM head; rows = the tokens of one micro batch), combined as FLOP-weighted harmonic mean
(the time an ideal step would spend), best of two passes. Ceiling tokens/s = rate / (T(n, h) per
token); a 2048^3 matmul is printed beside it for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import peers  # noqa: E402
import turns  # noqa: E402

SMOL_YAML = common.REPO / "configs" / "smollm2.yaml"
SROOT = common.OUT / "smol"  # beer data prepared with smollm2.yaml's splits, shared by every run
TURNS = common.OUT / "lora-turns"
HOOK = common.REPO / "bench" / "turnhook"
MODEL = "smollm2-135m"
# issue 16's targets: speed-up over the peer, share of the ceiling, peak RSS over the peer's
TARGETS = {"sft": 1.5, "rm": 1.5, "ppo": 2.0}
CEILING_TARGET = 0.5
RSS_TARGET = 1.10
BENCH_RM_EVAL = 0.02
STEP_PHASE = {"sft": "training", "rm": "training", "ppo": "actor generation"}  # the beat that opens a step
LOADS: list[str] = []  # load average at each round's start


# ------------------------------------------------------------------------------------ setup
def model_dir() -> Path:
    from stackllama_ds.models.fetch import fetch_model

    return fetch_model(MODEL, log=common.log)


def smol() -> dict:
    return yaml.safe_load(SMOL_YAML.read_text())


def ensure_data() -> Path:
    """The beer dump prepared once with smollm2.yaml's seed and splits, but for rm_eval: 2% instead of
    10% (the rest to rl_eval), since our RM run evaluates on all of it after its last step, which
    takes minutes on a busy 2-core box and is not what is timed."""
    from stackllama_ds.config import load_config

    done = SROOT / "DATA_DONE"
    if not done.exists():
        from stackllama_ds.data.prepare import prepare

        cfg = load_config(SMOL_YAML, check_files=False)
        sp = cfg.data.splits
        sp.rl_eval, sp.rm_eval = sp.rl_eval + sp.rm_eval - BENCH_RM_EVAL, BENCH_RM_EVAL
        common.log("[bench] preparing the beer dump with smollm2.yaml's splits ...")
        shutil.rmtree(SROOT / "data", ignore_errors=True)
        prepare(common.BEER, SROOT / "data", cfg=cfg.data, seed=cfg.seed, log=lambda *a, **k: None)
        done.write_text(f"prepare, rm_eval {BENCH_RM_EVAL}\n")
    return SROOT / "data"


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(run: Path, nproc: int, **sections) -> Path:
    """configs/smollm2.yaml on the beer data, ``nproc`` ranks, with ``sections`` merged in."""
    cfg = smol()
    cfg["output_root"] = str(run)
    cfg["data"]["posts"] = str(common.BEER)
    cfg["logging"] = {"progress": False}
    cfg["launch"]["nproc_per_node"] = nproc
    cfg["launch"]["hang_timeout_s"] = 3600  # a rank waits out the other sides' steps, on a busy box
    cfg = merge(cfg, sections)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "data").symlink_to(ensure_data())
    path = run / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def resolved_dtype() -> str:
    from stackllama_ds.hardware import auto_dtype

    return auto_dtype()


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


Turn = dict  # {"folder", "index", "n"}: this side's place in a round (bench/turns.py)


def run_cli(stage: str, cfg: Path, threads: int | None, turn: Turn, what: str) -> tuple[list[float], float]:
    """Our stage through the CLI in a fresh process, gated step by step; (step seconds, peak RSS MB)."""
    extra = {"BENCH_TURNS": json.dumps(turn), "BENCH_TURN_PHASE": STEP_PHASE[stage],
             "PYTHONPATH": f"{HOOK}{os.pathsep}{common.REPO}"}
    if threads:
        extra["OMP_NUM_THREADS"] = str(threads)
    r, rss = common.run_measured([sys.executable, "-m", "stackllama_ds.cli", stage, str(cfg)], extra_env=extra)
    common.check(r, what)
    return turns.read_times(Path(turn["folder"]), turn["index"]), rss


def run_peer(py: Path, script: str, args: list[str], what: str) -> tuple[dict, float]:
    r, rss = common.run_measured([str(py), str(common.REPO / "bench" / script), *args])
    common.check(r, what)
    return json.loads(next(x for x in r.stdout.splitlines() if x.startswith("@@RESULT "))[9:]), rss


def timed(times: list, warmup: int, drop_last: bool) -> list:
    kept = times[warmup:len(times) - 1 if drop_last else len(times)]
    if not kept:
        raise RuntimeError(f"no timed steps left of {len(times)} (warm-up {warmup})")
    return kept


def interleaved(rounds: int, sides: dict[str, Callable[[int, Turn], dict]], show: Callable[[dict], str],
                retry_s: float = 120) -> dict[str, list[dict]]:
    """Each round starts every side at once, taking turns step by step (bench/turns.py); the order
    rotates by round. ``sides[name](round, turn)`` returns a dict. A failed round is retried once
    (others edit stackllama_ds/ in this working tree)."""
    res: dict[str, list[dict]] = {k: [] for k in sides}
    names = list(sides)
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for attempt in range(2):
            if attempt == 0:
                LOADS.append(load_avg())
            turns.setup(TURNS, len(order))

            def go(name: str, idx: int, i: int = i, n: int = len(order)) -> dict:  # bound now: runs in this round
                try:
                    return sides[name](i, {"folder": str(TURNS), "index": idx, "n": n})
                finally:
                    turns.mark_done(TURNS, idx)  # the others stop waiting for this side

            with ThreadPoolExecutor(len(order)) as ex:
                futs = {n: ex.submit(go, n, idx) for idx, n in enumerate(order)}
            errs = {n: f.exception() for n, f in futs.items() if f.exception() is not None}
            if not errs:
                break
            if attempt == 1:
                raise next(iter(errs.values()))
            common.log(f"[bench] round {i + 1} failed ({', '.join(errs)}): {str(next(iter(errs.values())))[-1500:]}"
                       f"\n[bench] retrying in {retry_s:.0f} s")
            time.sleep(retry_s)
        for n in names:
            res[n].append(futs[n].result())
            common.log(f"  {n} round {i + 1} ({order.index(n) + 1}. of {len(order)}): {show(res[n][-1])}")
    return res


# ------------------------------------------------------------------------------------ FLOPs
@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    inter: int
    layers: int
    d: int  # heads x head_dim
    d_kv: int  # kv heads x head_dim

    @classmethod
    def of(cls, folder: Path) -> Shape:
        c = json.loads((folder / "config.json").read_text())
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        kv = c.get("num_key_value_heads") or c["num_attention_heads"]
        return cls(c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                   c["num_attention_heads"] * hd, kv * hd)

    def linears(self) -> list[tuple[int, int, int]]:
        """(d_in, d_out, count) of every matmul one token passes: q, k+v, o, gate+up, down per layer, LM head."""
        H, L = self.hidden, self.layers
        return [(H, self.d, L), (H, self.d_kv, 2 * L), (self.d, H, L), (H, self.inter, 2 * L), (self.inter, H, L),
                (H, self.vocab, 1)]

    def n_body(self) -> int:
        return sum(i * o * c for i, o, c in self.linears()[:-1])

    def n_lora(self, r: int, targets: list[str]) -> int:
        dims = {"q_proj": (self.hidden, self.d), "k_proj": (self.hidden, self.d_kv), "v_proj": (self.hidden, self.d_kv),
                "o_proj": (self.d, self.hidden), "gate_proj": (self.hidden, self.inter),
                "up_proj": (self.hidden, self.inter), "down_proj": (self.inter, self.hidden)}
        return self.layers * sum(r * sum(dims[t]) for t in targets)


def fwd_flops(s: Shape, n: int, h: int, n_lora: int = 0) -> float:
    """F(n, h): forward of n tokens, h of them through the LM head."""
    return 2 * s.n_body() * n + 2 * n_lora * n + 4 * s.layers * s.d * n * (n + 1) / 2 + 2 * s.vocab * s.hidden * h


def train_flops(s: Shape, n: int, h: int, n_lora: int) -> float:
    """T(n, h): forward + backward of a LoRA step over a frozen base (input gradients only)."""
    return (4 * s.n_body() * n + 6 * n_lora * n + 3 * 4 * s.layers * s.d * n * (n + 1) / 2
            + 4 * s.vocab * s.hidden * h)


def shape_rate(s: Shape, rows: int, dtype: str, threads: int, head: bool = True, reps: int = 3) -> float:
    """FLOP/s of F.linear at the step's shapes: the FLOP-weighted harmonic mean over the model's matmuls."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    td = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    flops = secs = 0.0
    for d_in, d_out, count in s.linears() if head else s.linears()[:-1]:
        x, w = torch.randn(rows, d_in, dtype=td), torch.randn(d_out, d_in, dtype=td)
        F.linear(x, w)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - t)
        flops += 2 * rows * d_in * d_out * count
        secs += best * count
    return flops / secs


def bursts(s: Shape, rows: int, dtype: str, threads: int, head: bool = True) -> str:
    """Best-of-bursts rates (at the step's shapes, 2048^3), for reference beside the probe's."""
    rate = max(shape_rate(s, rows, dtype, threads, head) for _ in range(2))
    return (f"best of short bursts now: {rate / 1e9:.0f} GFLOP/s at the step's shapes, "
            f"{common.matmul_rate(dtype, threads=threads) / 1e9:.0f} at 2048^3")


def probe_side(a, s: Shape, rows: int, head: bool, flops: float, tag: str, turn: Turn, drop_last: bool) -> dict:
    """The matmul rate at the step's shapes, as a side taking turns with the steps (bench/lora_probe.py)."""
    out = common.OUT / f"lora-probe-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    spec = {"rows": rows, "dtype": a.dtype, "threads": a.threads, "flops": flops, "steps": a.steps, "turns": turn,
            "linears": s.linears() if head else s.linears()[:-1]}
    (out / "spec.json").write_text(json.dumps(spec))
    res, rss = run_peer(Path(sys.executable), "lora_probe.py", [str(out / "spec.json")], f"matmul probe ({tag})")
    kept = timed(res["turns"], a.warmup, drop_last)
    shutil.rmtree(out, ignore_errors=True)
    return {"rate": sum(x["flops"] for x in kept) / sum(x["t"] for x in kept), "rss": rss}


def ceiling_lines(s: Shape, rows: int, head: bool, per_unit: float, unit: str, res: dict[str, list[dict]],
                  key: str, a) -> tuple[str, float]:
    """Print-ready share of the ceiling of each side's median throughput (in ``unit``/s), and ours'."""
    rate = common.median([x["rate"] for x in res["matmul"]])
    ceiling = rate / per_unit
    sides = {k: common.median([x[key] for x in v]) for k, v in res.items() if k != "matmul"}
    shares = {k: v / ceiling for k, v in sides.items()}
    per_round = ", ".join(f"{x['rate'] / 1e9:.0f}" for x in res["matmul"])
    txt = (f"\n{a.dtype} matmul at the step's shapes ({rows} rows, {a.threads} threads), taking turns with the steps: "
           f"{rate / 1e9:.0f} GFLOP/s (rounds: {per_round}; "
           f"{bursts(s, rows, a.dtype, a.threads, head)}); LoRA step {per_unit / 1e9:,.2f} GFLOP per {unit[:-1]} -> "
           f"ceiling {ceiling:,.2f} {unit}/s; " + ", ".join(f"{k} {v:,.2f} {unit}/s = {100 * shares[k]:.0f}% of it"
                                                          for k, v in sides.items()))
    return txt, shares["ours"]


# ------------------------------------------------------------------------------------ SFT
def sft_texts() -> Path:
    from stackllama_ds.data.prepare import load_prepared, sft_texts

    path = SROOT / "sft_texts.jsonl"
    if not path.exists():
        texts = sft_texts(load_prepared(ensure_data())["sft"])
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def sft_ours(a, tag: str, turn: Turn, nproc: int = 1, threads: int | None = None, zero: int | None = None) -> dict:
    run = common.OUT / f"lora-sft-{tag}"
    eng = {"zero_stage": a.zero if zero is None else zero}
    cfg = write_config(run, nproc, sft={"max_steps": a.steps, "eval_every": 10_000, "eval_batches": 1,
                                        "save_every": 10_000, "engine": eng})
    times, rss = run_cli("sft", cfg, threads, turn, f"our sft ({tag})")
    sc = smol()["sft"]
    dts = timed(times, a.warmup, drop_last=True)  # our last step also evaluates
    shutil.rmtree(run, ignore_errors=True)
    return {"tps": sc["engine"]["micro_batch_size"] * sc["seq_length"] * nproc / (sum(dts) / len(dts)), "rss": rss}


def lora_spec(section: dict) -> dict:
    from stackllama_ds.config import LoraConfig

    lo = LoraConfig(**{k: v for k, v in section.items() if k != "enabled"})
    return {"r": lo.r, "alpha": lo.alpha, "dropout": lo.dropout, "target_modules": list(lo.target_modules)}


def sft_peer(a, py: Path, tag: str, turn: Turn) -> dict:
    from stackllama_ds.config import OptimConfig

    out = common.OUT / f"lora-peer-sft-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sc = smol()["sft"]
    opt = OptimConfig(**sc["optim"])
    spec = {"model": str(model_dir()), "data": str(sft_texts()), "out": str(out), "seq_length": sc["seq_length"],
            "micro_batch": sc["engine"]["micro_batch_size"], "steps": a.steps, "dtype": a.dtype, "lr": opt.lr,
            "weight_decay": opt.weight_decay, "betas": list(opt.betas), "scheduler": opt.scheduler,
            "warmup_steps": opt.warmup_steps, "threads": a.threads, "base_dtype": a.peer_base,
            "lora": lora_spec(sc["lora"]), "turns": turn}
    (out / "spec.json").write_text(json.dumps(spec))
    res, rss = run_peer(py, "peer_trl_lora.py", ["sft", str(out / "spec.json")], f"TRL SFTTrainer ({tag})")
    dts = timed(res["times"], a.warmup, drop_last=True)  # the same steps as ours
    shutil.rmtree(out, ignore_errors=True)
    return {"tps": res["per_step"] / (sum(dts) / len(dts)), "rss": rss, "info": res}


def stage_sft(a, shape: Shape) -> float:
    sc = smol()["sft"]
    seq, mb = sc["seq_length"], sc["engine"]["micro_batch_size"]
    py = peer("trl116")
    print(f"# SFT, LoRA: {header(a)}; seq {seq}, micro batch {mb}, packing, LoRA {lora_text(sc['lora'])}; "
          f"{a.steps} steps ({a.warmup} warm-up, the last not timed); peer: TRL 1.16.0 SFTTrainer (packing "
          f"wrapped, same peft LoRA, base in {a.peer_base}, gradient checkpointing off as ours)")
    n_lora = shape.n_lora(sc["lora"]["r"], lora_spec(sc["lora"])["target_modules"])
    per_tok = train_flops(shape, seq, seq, n_lora) / seq
    res = interleaved(a.rounds, {
        "ours": lambda i, t: sft_ours(a, str(i), t),
        "TRL": lambda i, t: sft_peer(a, py, str(i), t),
        "matmul": lambda i, t: probe_side(a, shape, mb * seq, True, per_tok * mb * seq, f"sft-{i}", t, True),
    }, lambda r: f"{r['tps']:.1f} tok/s, {r['rss']:.0f} MB" if "tps" in r else f"{r['rate'] / 1e9:.0f} GFLOP/s")
    print(common.compare_table({k: v for k, v in res.items() if k != "matmul"}, "tps", "tok/s", f"SFT LoRA ({a.dtype})"))
    txt, share = ceiling_lines(shape, mb * seq, True, per_tok, "tokens", res, "tps", a)
    print(txt)
    info = res["TRL"][0]["info"]
    print(f"\npeer: {info['trainable']:,} trainable parameters, base {info['base_dtype']}, optimizer {info['optim']}, "
          f"gradient checkpointing {info['gradient_checkpointing']}; ours: DeepSpeed bf16 engine, AdamW (torch fused)")
    return verdict(a, "sft", res, "tps", True, share)


# ------------------------------------------------------------------------------------ RM
def pairs_file(max_length: int) -> Path:
    """rm_train pairs whose two texts fit ``max_length`` tokens: what ``overlength: filter`` keeps."""
    from stackllama_ds.data.prepare import load_prepared
    from stackllama_ds.data.template import format_qa
    from stackllama_ds.models.load import load_tokenizer

    path = SROOT / f"rm_pairs_{max_length}.jsonl"
    if not path.exists():
        tok = load_tokenizer(model_dir())
        split = load_prepared(ensure_data())["rm_train"]
        lines = []
        for q, j, k in zip(split["question"], split["response_j"], split["response_k"]):
            cj, ck = format_qa(q, j), format_qa(q, k)
            lens = [len(x) for x in tok([cj, ck])["input_ids"]]
            if max(lens) <= max_length:
                lines.append(json.dumps({"chosen": cj, "rejected": ck, "lens": lens}) + "\n")
        path.write_text("".join(lines))
    return path


def rm_ours(a, tag: str, turn: Turn, packed: bool = True) -> dict:
    run = common.OUT / f"lora-rm-{tag}"
    cfg = write_config(run, 1, rm={"init_from": str(model_dir()), "max_steps": a.steps, "eval_every": 10_000,
                                   "save_every": 10_000, "overlength": "filter", "engine": {"zero_stage": a.zero},
                                   "packed": packed})
    times, rss = run_cli("rm", cfg, None, turn, f"our rm ({tag})")
    dts = timed(times, a.warmup, drop_last=True)  # our last step also evaluates
    shutil.rmtree(run, ignore_errors=True)
    return {"pps": smol()["rm"]["engine"]["micro_batch_size"] / (sum(dts) / len(dts)), "rss": rss}


def rm_peer(a, py: Path, tag: str, turn: Turn) -> dict:
    from stackllama_ds.config import RMOptimConfig

    out = common.OUT / f"lora-peer-rm-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rc = smol()["rm"]
    opt = RMOptimConfig(**rc["optim"])
    spec = {"model": str(model_dir()), "data": str(pairs_file(rc["max_length"])), "out": str(out),
            "seq_length": rc["max_length"], "micro_batch": rc["engine"]["micro_batch_size"], "steps": a.steps,
            "dtype": a.dtype, "lr": opt.lr, "weight_decay": opt.weight_decay, "betas": list(opt.betas),
            "scheduler": opt.scheduler, "warmup_steps": opt.warmup_steps, "threads": a.threads,
            "base_dtype": a.peer_base, "lora": lora_spec(rc["lora"]), "turns": turn, "order": rm_order(a)}
    (out / "spec.json").write_text(json.dumps(spec))
    res, rss = run_peer(py, "peer_trl_lora.py", ["rm", str(out / "spec.json")], f"TRL RewardTrainer ({tag})")
    dts = timed(res["times"], a.warmup, drop_last=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"pps": res["per_step"] / (sum(dts) / len(dts)), "rss": rss, "info": res}


def rm_order(a) -> list[int]:
    """The pairs (lines of ``pairs_file``) our 1-rank RM run trains on, in its order: its ``pair_batches``
    over the filtered rm_train pairs (the same list, same order) with ``epoch_order(n, seed, 0)``."""
    from stackllama_ds.data.packing import epoch_order

    n = sum(1 for _ in open(pairs_file(smol()["rm"]["max_length"])))
    need = a.steps * smol()["rm"]["engine"]["micro_batch_size"]
    assert need <= n, "one pass of the pairs is enough for the benchmark"
    return epoch_order(n, smol()["seed"], 0)[:need]


def timed_ids(a, order: list[int]) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) of the timed steps' pairs, in our run's order."""
    from stackllama_ds.models.load import load_tokenizer

    rc = smol()["rm"]
    mb, lines = rc["engine"]["micro_batch_size"], open(pairs_file(rc["max_length"])).readlines()
    texts = [json.loads(lines[i]) for i in order[a.warmup * mb:(a.steps - 1) * mb]]
    ids = load_tokenizer(model_dir())([x for t in texts for x in (t["chosen"], t["rejected"])])["input_ids"]
    return list(zip(ids[::2], ids[1::2]))


def stage_rm(a, shape: Shape) -> float:
    rc = smol()["rm"]
    L, mb = rc["max_length"], rc["engine"]["micro_batch_size"]
    lens = [json.loads(x)["lens"] for x in open(pairs_file(L))]
    order = rm_order(a)
    pairs = [lens[i] for i in order[a.warmup * mb:(a.steps - 1) * mb]]  # the timed steps' pairs
    py = peer("trl116")
    print(f"# RM, LoRA: {header(a)}; {len(lens)} rm_train pairs within {L} tokens (ours: overlength filter), "
          f"micro batch {mb} pairs, LoRA {lora_text(rc['lora'])} SEQ_CLS + trained score head; {a.steps} steps "
          f"({a.warmup} warm-up, the last not timed); peer: TRL 1.16.0 RewardTrainer (same peft LoRA, base in "
          f"{a.peer_base}, gradient checkpointing off as ours), fed the pairs our run draws, in its order; "
          f"ours {'packed' if rc.get('packed', True) else 'padded'} (rm.packed)")
    n_lora = shape.n_lora(rc["lora"]["r"], lora_spec(rc["lora"])["target_modules"])
    per_pair = sum(train_flops(shape, c, 0, n_lora) + train_flops(shape, r, 0, n_lora) for c, r in pairs) / len(pairs)
    mean_tokens = sum(c + r for c, r in pairs) / len(pairs)
    rows = int(mb * mean_tokens)
    padded = {"ours padded": lambda i, t: rm_ours(a, f"{i}-padded", t, packed=False)} if a.rm_padded else {}
    res = interleaved(a.rounds, {
        "ours": lambda i, t: rm_ours(a, str(i), t),
        **padded,
        "TRL": lambda i, t: rm_peer(a, py, str(i), t),
        "matmul": lambda i, t: probe_side(a, shape, rows, False, per_pair * mb, f"rm-{i}", t, True),
    }, lambda r: f"{r['pps']:.3f} pairs/s, {r['rss']:.0f} MB" if "pps" in r else f"{r['rate'] / 1e9:.0f} GFLOP/s")
    print(common.compare_table({k: v for k, v in res.items() if k != "matmul"}, "pps", "pairs/s",
                               f"RM LoRA ({a.dtype})"))
    print(common.rm_tokens_line(common.rm_tokens(timed_ids(a, order), mb)))
    txt, share = ceiling_lines(shape, rows, False, per_pair, "pairs", res, "pps", a)
    print(txt + f" (the timed steps' pairs hold {mean_tokens:.0f} real tokens on average)")
    info = res["TRL"][0]["info"]
    print(f"\npeer: {info['trainable']:,} trainable parameters, base {info['base_dtype']}, optimizer {info['optim']}")
    return verdict(a, "rm", res, "pps", True, share)


# ------------------------------------------------------------------------------------ PPO
PHASES = ("t_generate", "t_score", "t_logprobs", "t_train")


def ppo_section(a, zero: int) -> dict:
    eng = {"zero_stage": zero}
    return {"steps": a.steps, "response_min_length": a.response_len, "response_max_length": a.response_len,
            "early_stopping": False, "save_every": 10_000, "log_samples": 0, "actor": eng, "critic": eng}


def ppo_run(a, name: str, nproc: int, zero: int) -> Path:
    """A run whose sft/model and rm/model are SmolLM2 (the reward: a fresh score head on it)."""
    cfg = write_config(common.OUT / name, nproc, ppo=ppo_section(a, zero))
    for stage in ("sft", "rm"):
        (cfg.parent / stage).mkdir()
        (cfg.parent / stage / "model").symlink_to(model_dir())
    return cfg


def ppo_ours(a, tag: str, turn: Turn, nproc: int = 1, threads: int | None = None, zero: int | None = None) -> dict:
    cfg = ppo_run(a, f"lora-ppo-{tag}", nproc, a.zero if zero is None else zero)
    times, rss = run_cli("ppo", cfg, threads, turn, f"our ppo ({tag})")
    rows = [x for x in common.read_jsonl(cfg.parent / "ppo" / "metrics.jsonl") if "t_generate" in x]
    steps = timed(times, a.warmup, drop_last=False)
    rows = rows[a.warmup:a.warmup + len(steps)]
    out = {k: sum(x[k] for x in rows) / len(rows) for k in PHASES}
    out["total"] = sum(steps) / len(steps)
    # The stage's t_generate starts before the turn gate: generation = the step less the other phases
    # (so it also holds GAE, whitening and the statistics, a few ms).
    out["t_generate"] = out["total"] - sum(out[k] for k in PHASES[1:])
    out["rps"] = smol()["ppo"]["batch_size"] * nproc / out["total"]  # rollouts per second, all ranks
    out["rss"] = rss
    shutil.rmtree(cfg.parent, ignore_errors=True)
    return out


def prompt_spec(a) -> list[dict]:
    """The prompts our 1-rank run draws at each step, for the peer to use in the same order."""
    from stackllama_ds.config import load_config
    from stackllama_ds.data.prompts import load_prompts, prompt_batch
    from stackllama_ds.models.load import load_tokenizer

    cfg = load_config(ppo_run(a, "lora-ppo-prompts", 1, a.zero), check_files=False)
    questions, ids, _ = load_prompts(cfg.root() / "data", load_tokenizer(model_dir()), "rl_train", cfg.ppo.max_prompt_length)
    shutil.rmtree(common.OUT / "lora-ppo-prompts", ignore_errors=True)
    B = cfg.ppo.batch_size
    return [{"prompt_ids": [ids[i] for i in idx], "questions": [questions[i] for i in idx]}
            for idx in (prompt_batch(len(questions), s * B, B, 0, 1, cfg.seed) for s in range(a.steps))]


def ppo_peer(a, py: Path, tag: str, steps: list[dict], turn: Turn) -> dict:
    out = common.OUT / f"lora-peer-ppo-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    p = smol()["ppo"]
    spec = {"model": str(model_dir()), "lr": p["optim"]["lr"], "batch_size": p["batch_size"],
            "mini_batch_size": p["mini_batch_size"], "ppo_epochs": p["ppo_epochs"], "response_len": a.response_len,
            "max_grad_norm": p["actor"].get("gradient_clipping"), "dtype": a.dtype, "steps": steps,
            "threads": a.threads, "base_dtype": a.peer_base, "lora": lora_spec(p["lora"]), "turns": turn}
    (out / "spec.json").write_text(json.dumps(spec))
    res, rss = run_peer(py, "peer_trl_ppo_lora.py", [str(out / "spec.json")], f"TRL PPOTrainer ({tag})")
    rows = res["rows"][a.warmup:]
    o = {k: sum(x[k] for x in rows) / len(rows) for k in ("t_generate", "t_score", "t_step", "total")}
    o["rss"], o["info"] = rss, res
    shutil.rmtree(out, ignore_errors=True)
    return o


def ppo_step_flops(shape: Shape, n_lora: int, prompt_lens: list[int], R: int, epochs: int) -> dict[str, float]:
    """FLOPs of the PPO phases over these rollouts (module docstring)."""
    f = {"generate": 0.0, "score": 0.0, "logprobs": 0.0, "train": 0.0}
    for p in prompt_lens:
        n = p + R
        f["generate"] += fwd_flops(shape, n, R, n_lora)
        f["score"] += fwd_flops(shape, n, 0)
        f["logprobs"] += fwd_flops(shape, n, R, n_lora) + fwd_flops(shape, n, R)
        f["train"] += epochs * train_flops(shape, n, R, n_lora)
    return f


def stage_ppo(a, shape: Shape) -> float:
    p = smol()["ppo"]
    py = peer("trl011")
    steps = prompt_spec(a)
    lens = [len(x) for s in steps[a.warmup:] for x in s["prompt_ids"]]
    print(f"# PPO, LoRA: {header(a)}; batch {p['batch_size']}, mini batch {p['mini_batch_size']}, {p['ppo_epochs']} PPO "
          f"epochs, {a.response_len} new tokens, prompts <= {p['max_prompt_length']} tokens (mean "
          f"{sum(lens) / len(lens):.0f} over the timed steps), LoRA {lora_text(p['lora'])}, reference = adapter "
          f"disabled, reward = SmolLM2 + fresh score head; {a.steps} steps ({a.warmup} warm-up), KL early stopping "
          f"off; peer: TRL 0.11.4 PPOTrainer (transformers 4.46.3, peft 0.13.2; "
          f"AutoModelForCausalLMWithValueHead(peft_config), ref_model=None, base in {a.peer_base})")
    n_lora = shape.n_lora(p["lora"]["r"], lora_spec(p["lora"])["target_modules"])
    fl = {k: v / (len(steps) - a.warmup) for k, v in
          ppo_step_flops(shape, n_lora, lens, a.response_len, p["ppo_epochs"]).items()}
    total = sum(fl.values())
    rows_train = int(p["mini_batch_size"] * (sum(lens) / len(lens) + a.response_len))
    res = interleaved(a.rounds, {
        "ours": lambda i, t: ppo_ours(a, str(i), t),
        "TRL": lambda i, t: ppo_peer(a, py, str(i), steps, t),
        "matmul": lambda i, t: probe_side(a, shape, rows_train, True, total, f"ppo-{i}", t, False),
    }, lambda r: f"{r['total']:.1f} s/step, {r['rss']:.0f} MB" if "total" in r else f"{r['rate'] / 1e9:.0f} GFLOP/s")
    rate = common.median([x["rate"] for x in res.pop("matmul")])
    print(common.compare_table(res, "total", "s/step", f"PPO step, LoRA ({a.dtype})", higher_is_better=False))
    med = {k: {c: common.median([x[c] for x in v]) for c in v[0] if c not in ("info", "rss")} for k, v in res.items()}
    o, t = med["ours"], med["TRL"]
    nan = float("nan")
    ours_t = [o["t_generate"], o["t_score"], o["t_logprobs"], o["t_train"], o["t_logprobs"] + o["t_train"], o["total"]]
    trl_t = [t["t_generate"], t["t_score"], nan, nan, t["t_step"], t["total"]]
    fls = [fl["generate"], fl["score"], fl["logprobs"], fl["train"], fl["logprobs"] + fl["train"], total]
    rows = [["ours s", *ours_t], ["TRL s", *trl_t], ["GFLOP", *(f / 1e9 for f in fls)],
            ["ours GFLOP/s", *(f / x / 1e9 for f, x in zip(fls, ours_t))],
            ["TRL GFLOP/s", *(f / x / 1e9 if x == x else nan for f, x in zip(fls, trl_t))],
            ["speed-up", *(y / x if y == y else nan for x, y in zip(ours_t, trl_t))]]
    print(common.table(["", "generate", "score", "log-probs", "train", "log-probs + train", "step"], rows,
                       "step split, FLOPs and FLOP/s (median of rounds; TRL's step() holds its log-probs and "
                       "training; our generate is the step less the other phases)"))
    print(f"\n{a.dtype} matmul at the training shapes ({rows_train} rows, {a.threads} threads), taking turns with the "
          f"steps: {rate / 1e9:.0f} GFLOP/s ({bursts(shape, rows_train, a.dtype, a.threads)}); the step's FLOPs over its time: ours {total / o['total'] / 1e9:.1f} GFLOP/s = "
          f"{100 * total / o['total'] / rate:.0f}% of it, TRL {total / t['total'] / 1e9:.1f} GFLOP/s = "
          f"{100 * total / t['total'] / rate:.0f}%; our training phase alone "
          f"{100 * fl['train'] / o['t_train'] / rate:.0f}%")
    info = res["TRL"][0]["info"]
    print(f"\npeer: {info['trainable']:,} trainable parameters (LoRA + value head), base {info['base_dtype']}")
    return verdict(a, "ppo", res, "total", False, None)


# ------------------------------------------------------------------------------------ scaling
def stage_scaling(a, which: str) -> float:
    """Ours on 1 rank x 1 core, 1 rank x every core and 2 ranks x cores/2, ZeRO as smollm2.yaml (2)."""
    cores = os.cpu_count() or 1
    per = max(1, cores // 2)
    zero = smol()[which]["engine" if which == "sft" else "actor"]["zero_stage"]
    if which == "sft":
        run, key, unit = sft_ours, "tps", "tok/s"
    else:
        run, key, unit = ppo_ours, "rps", "rollouts/s"
    print(f"# {which.upper()} scaling, LoRA, ours: {header(a)}; ZeRO-{zero} on every side; 1 rank has {per} or "
          f"{cores} cores, each of 2 ranks has {per} (OMP_NUM_THREADS); per rank as smollm2.yaml "
          f"({'seq 512 x micro 2' if which == 'sft' else f'batch 8, mini batch 2, {a.response_len} new tokens'}); "
          f"{a.steps} steps ({a.warmup} warm-up{', the last not timed' if which == 'sft' else ''}); the three "
          f"sides take turns step by step")
    res = interleaved(a.rounds, {
        f"1 rank x {per} core": lambda i, t: run(a, f"s1c-{i}", t, 1, per, zero),
        f"1 rank x {cores} cores": lambda i, t: run(a, f"s1-{i}", t, 1, None, zero),
        f"2 ranks x {per} core": lambda i, t: run(a, f"s2-{i}", t, 2, None, zero),
    }, lambda r: f"{r[key]:.3f} {unit}, {r['rss']:.0f} MB")
    small, one, two = res.values()
    rows = [[f"round {i + 1}", small[i][key], one[i][key], two[i][key], two[i][key] / (2 * small[i][key]),
             two[i][key] / one[i][key], one[i]["rss"], two[i]["rss"]] for i in range(a.rounds)]
    s_, o, t = (common.median([x[key] for x in v]) for v in (small, one, two))
    rows.append(["median", s_, o, t, t / (2 * s_), t / o, max(x["rss"] for x in one), max(x["rss"] for x in two)])
    print(common.table(["", *(f"{k} {unit}" for k in res), "efficiency (equal cores/rank)",
                        "speed-up on the same machine", "1-rank peak RSS MB", "2-rank peak RSS MB per rank"], rows,
                       f"{which.upper()} scaling, LoRA ({a.dtype}, ZeRO-{zero})"))
    if which == "ppo":
        split = [[k, *(common.median([x[c] for x in v]) for c in (*PHASES, "total"))] for k, v in res.items()]
        print(common.table(["", "generate s", "score s", "log-probs s", "train s", "step s"], split,
                           "time split per step (median of rounds; each rank's own batch of 8)"))
    print(f"\nload average at each round's start: {'; '.join(LOADS)}; now {load_avg()}")
    print(f"\n{which}-scaling: 2 ranks / (2 x 1 rank), {per} core per rank = {t / (2 * s_):.2f}")
    return t / (2 * s_)


# ------------------------------------------------------------------------------------ report
def peer(name: str) -> Path:
    py, why = peers.ensure(name, log=common.log)
    if py is None:
        raise SystemExit(f"peer {name} could not be set up: {why}")
    return py


def header(a) -> str:
    return (f"{common.machine()}; load average {load_avg()}; SmolLM2-135M-Instruct (134.5M params, 30 layers, "
            f"hidden 576), {a.dtype} (dtype auto), 1 rank x {a.threads} threads unless named, our ZeRO-{a.zero}")


def lora_text(section: dict) -> str:
    lo = lora_spec(section)
    return f"r{lo['r']} alpha {lo['alpha']} dropout {lo['dropout']} on {','.join(lo['target_modules'])}"


def verdict(a, stage: str, res: dict, key: str, higher: bool, share: float | None) -> float:
    """The targets of issue 16 against the medians; the last line is ``<stage>: ours/TRL = <ratio>``."""
    o, t = (common.median([x[key] for x in res[k]]) for k in ("ours", "TRL"))
    ratio = o / t if higher else t / o
    rss = max(x["rss"] for x in res["ours"]) / max(x["rss"] for x in res["TRL"])
    lines = [f"speed-up {ratio:.2f}x (target >= {TARGETS[stage]}x: "
             f"{'met' if ratio >= TARGETS[stage] else f'missed by {100 * (1 - ratio / TARGETS[stage]):.0f}%'})",
             f"peak RSS {100 * rss:.0f}% of TRL's (target <= {100 * RSS_TARGET:.0f}%: "
             f"{'met' if rss <= RSS_TARGET else 'missed'})"]
    if share is not None:
        lines.append(f"{100 * share:.0f}% of the ceiling (target >= {100 * CEILING_TARGET:.0f}%: "
                     f"{'met' if share >= CEILING_TARGET else 'missed'})")
    print(f"\ntargets: {'; '.join(lines)}")
    print(f"load average at each round's start: {'; '.join(LOADS)}; now {load_avg()}")
    print(f"\n{stage}: ours/TRL = {ratio:.2f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", required=True, choices=["sft", "rm", "ppo", "sft-scaling", "ppo-scaling"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="default: 5 (SFT, RM), 3 (PPO)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rm-padded", action="store_true", help="RM: also our padded rows (rm.packed false)")
    ap.add_argument("--response-len", type=int, default=36, help="PPO: the mean of smollm2.yaml's 24-48")
    ap.add_argument("--zero", type=int, default=0, help="our ZeRO stage on 1 rank")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of a 1-rank run (peer and matmul)")
    ap.add_argument("--peer-base", choices=["bf16", "fp32"], default=None,
                    help="dtype of the peer's frozen base (default: the run's dtype)")
    a = ap.parse_args()
    a.steps = a.steps or (3 if a.stage.startswith("ppo") else 5)
    a.dtype = resolved_dtype()
    a.peer_base = a.peer_base or a.dtype
    folder = model_dir()
    ensure_data()
    shape = Shape.of(folder)
    if a.stage.endswith("-scaling"):
        stage_scaling(a, a.stage.split("-")[0])
    else:
        {"sft": stage_sft, "rm": stage_rm, "ppo": stage_ppo}[a.stage](a, shape)


if __name__ == "__main__":
    main()
