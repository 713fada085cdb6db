"""What the benchmarks share: the benchmark model and data, configs, runs in a subprocess, tables.

The benchmark model is a Llama built by the tiny-model kit at benchmark size (hidden 512, 8 layers,
~34M parameters, a byte-level BPE tokenizer of 8192 tokens trained on the beer dump), saved with
``save_pretrained`` into ``bench/out/root/tiny`` and loaded by every stage and every peer with
``from_pretrained``. Everything lands under ``bench/out/`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
ROOT = OUT / "root"  # data/ and tiny/ shared by every benchmark run
BEER = REPO / "data" / "beer.stackexchange.com" / "Posts.xml"
TINY_YAML = REPO / "configs" / "tiny.yaml"

BENCH_MODEL = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
}


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
             DISABLE_TQDM="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        e.pop(k, None)
    e.update(extra)
    return e


def heap_env() -> dict[str, str]:
    """Our launcher's glibc heap settings, to give a peer the same allocator behaviour."""
    from stackllama_ds.launcher.spawn import MALLOC_ENV

    return dict(MALLOC_ENV)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_root() -> Path:
    """Prepare the beer dump and build the benchmark model once (cached in bench/out/root)."""
    from stackllama_ds.config import TinyModelConfig, load_config

    cfg = load_config(TINY_YAML, check_files=False)
    if not (ROOT / "data" / "DONE").exists():
        from stackllama_ds.data.prepare import prepare

        log("[bench] preparing the beer dump ...")
        prepare(BEER, ROOT / "data", cfg=cfg.data, seed=cfg.seed, log=lambda *a, **k: None)
        (ROOT / "data" / "DONE").write_text("prepare\n")
    marker = ROOT / "tiny" / "BENCH_MODEL.json"
    if not marker.exists() or json.loads(marker.read_text()) != BENCH_MODEL:
        from stackllama_ds.models.tiny import make_tiny

        log("[bench] building the benchmark model ...")
        make_tiny(ROOT / "data", ROOT / "tiny", seed=0, cfg=TinyModelConfig(**BENCH_MODEL))
        marker.write_text(json.dumps(BENCH_MODEL))
    return ROOT


def n_params(model_dir: Path = ROOT / "tiny") -> int:
    c = json.loads((model_dir / "config.json").read_text())
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = h // c["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv * hd + 3 * h * i + 2 * h
    return L * per_layer + (1 if c.get("tie_word_embeddings") else 2) * v * h + h


def write_config(run: Path, root: Path = ROOT, model: dict | None = None, **sections) -> Path:
    """configs/tiny.yaml pointed at the benchmark root/model, with sections merged (nested dicts)."""
    cfg = yaml.safe_load(TINY_YAML.read_text())
    cfg["output_root"] = str(run)
    cfg["data"]["posts"] = str(BEER)
    cfg["model"]["tiny"] = dict(model or BENCH_MODEL)
    cfg["logging"] = {"progress": False}

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    cfg = merge(cfg, sections)
    run.mkdir(parents=True, exist_ok=True)
    for name in ("data", "tiny"):
        link = run / name
        if not link.exists():
            link.symlink_to(root / name)
    path = run / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_measured(cmd: list[str], *, cwd: Path = REPO, extra_env: dict[str, str] | None = None,
                 timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    """Run cmd in a fresh subprocess; returns (result, peak RSS in MB of its largest process).

    The peak is read with getrusage(RUSAGE_CHILDREN) inside a one-shot wrapper, so it covers the
    command and every rank it spawned (ru_maxrss is the largest single process: the peak per rank).
    """
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
               "print('\\n@@RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, flush=True); "
               "sys.exit(r)")
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, env=env(**(extra_env or {})),
                       capture_output=True, text=True, timeout=timeout)
    rss = 0.0
    for line in r.stdout.splitlines():
        if line.startswith("@@RSS"):
            rss = float(line.split()[1])
    return r, rss


def check(r: subprocess.CompletedProcess, what: str) -> None:
    if r.returncode:
        raise RuntimeError(f"{what} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def step_times(elapsed: list[float], skip: int) -> list[float]:
    """Per-step wall times from cumulative elapsed seconds, the first ``skip`` steps dropped (warm-up)."""
    d = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return d[max(0, skip - 1):]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rm_tokens(pairs: list[tuple[list[int], list[int]]], micro_batch: int) -> dict[str, float]:
    """Tokens per pair through the model, over ``pairs`` (chosen ids, rejected ids) in micro batches in
    training order: ``padded`` = TRL's 2B rows [chosen..., rejected...] padded to the micro batch's
    longest; ``real`` = the texts' own tokens; ``packed`` = ours (``rm.packed``): one row, each pair's
    shared question (common token prefix) once, no padding."""
    from stackllama_ds.data.packed_pairs import common_prefix

    n = len(pairs) // micro_batch * micro_batch
    batches = [pairs[s:s + micro_batch] for s in range(0, n, micro_batch)]
    padded = sum(2 * len(b) * max(len(x) for p in b for x in p) for b in batches)
    real = sum(len(c) + len(r) for c, r in pairs[:n])
    packed = real - sum(common_prefix([c, r]) for c, r in pairs[:n])
    return {"padded": padded / n, "real": real / n, "packed": packed / n}


def rm_tokens_line(t: dict[str, float]) -> str:
    """``rm_tokens`` as the line printed beside an RM speed-up."""
    return (f"tokens per pair: TRL {t['padded']:.0f} (padded to the micro batch's longest; {t['real']:.0f} real), "
            f"ours {t['packed']:.0f} (question once, no padding): ours/TRL = {t['packed'] / t['padded']:.2f} "
            f"({t['padded'] - t['real']:.0f} padding + {t['real'] - t['packed']:.0f} repeated question tokens saved)")


def matmul_rate(dtype: str = "bf16", n: int = 2048, threads: int | None = None, reps: int = 5) -> float:
    """Best-of-reps FLOP/s of an n^3 matmul (the machine's dense ceiling in that precision)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    td = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    a, b = torch.randn(n, n, dtype=td), torch.randn(n, n, dtype=td)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def alternate(rounds: int, sides: dict[str, Callable[[int], dict]], show: Callable[[dict], str]) -> dict[str, list[dict]]:
    """Each round runs every side once, in order (ours, peer, ours, peer ...), each in fresh processes,
    so a ratio taken within a round holds on a noisy machine. ``sides[name](round)`` returns a dict."""
    res: dict[str, list[dict]] = {k: [] for k in sides}
    for i in range(rounds):
        for name, fn in sides.items():
            res[name].append(fn(i))
            log(f"  {name} round {i + 1}: {show(res[name][-1])}")
    return res


HEAP_NOTE = "; TRL+heap = the peer with our MALLOC_* settings"


def add_peer_heap_arg(ap) -> None:
    ap.add_argument("--peer-heap", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the peer with our launcher's MALLOC_* settings")


def peer_sides(ours: Callable[[int], dict], peer: Callable[[int, bool], dict] | None,
               heap: bool) -> dict[str, Callable[[int], dict]]:
    """The sides of a comparison: ours, the TRL peer (``peer(round, heap=False)``) when it could be
    set up, and the peer with our heap settings when ``heap``."""
    sides = {"ours": ours}
    if peer is not None:
        sides["TRL"] = lambda i: peer(i, False)
        if heap:
            sides["TRL+heap"] = lambda i: peer(i, True)
    return sides


def compare_table(res: dict[str, list[dict]], key: str, unit: str, title: str, higher_is_better: bool = True,
                  ours: str = "ours") -> str:
    """Rounds and medians of ``key`` per side, our ratio to every other side, peak RSS per side.

    Ratios are ours/peer for a throughput and peer/ours (our speed-up) for a time, so > 1 means
    ours is better either way; the median row's ratio is the ratio of the medians.
    """
    others = [k for k in res if k != ours]
    rounds = len(res[ours])

    def ratio(o: float, t: float) -> float:
        return o / t if higher_is_better else t / o

    head = [""] + [f"{k} {unit}" for k in res]
    head += [f"{ours}/{k}" if higher_is_better else f"speed-up vs {k}" for k in others]
    head += [f"{k} peak RSS MB" for k in res]
    rows = []
    for i in range(rounds):
        rows.append([f"round {i + 1}"] + [res[k][i][key] for k in res]
                    + [ratio(res[ours][i][key], res[k][i][key]) for k in others]
                    + [res[k][i]["rss"] for k in res])
    med = {k: median([x[key] for x in v]) for k, v in res.items()}
    rows.append(["median"] + [med[k] for k in res] + [ratio(med[ours], med[k]) for k in others]
                + [max(x["rss"] for x in v) for v in res.values()])
    return table(head, rows, title)


def table(headers: list[str], rows: list[list], title: str = "") -> str:
    """A GitHub-markdown table (readable in a terminal and pasteable into RESULTS.md)."""
    cells = [[h for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [f"| {' | '.join(c.rjust(w[i]) for i, c in enumerate(cells[0]))} |",
             f"|{'|'.join('-' * (x + 2) for x in w)}|"]
    lines += [f"| {' | '.join(c.rjust(w[i]) for i, c in enumerate(r))} |" for r in cells[1:]]
    return (f"\n{title}\n" if title else "\n") + "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        return f"{c:.3g}" if abs(c) < 10 else f"{c:,.0f}" if abs(c) >= 1000 else f"{c:.1f}"
    return str(c)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"


def self_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
