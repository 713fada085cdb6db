"""What the benchmarks share: runs in fresh processes, sides that take turns, peers' venvs, FLOPs, tables.

    python bench/harness.py peers [trl116 trl011]    # set up the TRL peers' venvs (cached in bench/peers/)

Everything lands under ``bench/out/`` and ``bench/peers/`` (git-ignored); ``ensure_root`` builds the
benchmark model, a ~34M Llama from the tiny-model kit, in ``bench/out/root/tiny``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import turns  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
ROOT = OUT / "root"  # data/ and tiny/ of the benchmark model, shared by every run
BEER = REPO / "data" / "beer.stackexchange.com" / "Posts.xml"
TINY_YAML = REPO / "configs" / "tiny.yaml"
SMOL_YAML = REPO / "configs" / "smollm2.yaml"
PEERS = REPO / "bench" / "peers"
BENCH_MODEL = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
               "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 2048}
LOADS: list[str] = []  # load average at each round's start


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def env(cuda: bool = False, **extra: str) -> dict[str, str]:
    """A child's environment: CPU DeepSpeed, offline, quiet, no inherited rank or thread settings. ``cuda``:
    DeepSpeed picks its accelerator; the caller's PYTHONPATH (gpu_check.sh's wheels) stays after the repo."""
    e = dict(os.environ)
    path = [str(REPO), *([os.environ["PYTHONPATH"]] if cuda and os.environ.get("PYTHONPATH") else [])]
    e.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DISABLE_TQDM="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
              *(["DS_ACCELERATOR"] if cuda else [])):
        e.pop(k, None)
    e.update(extra)
    return e


def run_measured(cmd: list[str], *, extra_env: dict[str, str] | None = None, timeout: float = 3600,
                 cuda: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    """cmd in a fresh subprocess: (result, peak RSS in MB of its largest process, i.e. per rank), read by
    getrusage(RUSAGE_CHILDREN) in a one-shot wrapper that covers every rank the command spawned."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
               "print('\\n@@RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "flush=True); sys.exit(r)")
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=REPO, env=env(cuda, **(extra_env or {})),
                       capture_output=True, text=True, timeout=timeout)
    rss = next((float(x.split()[1]) for x in r.stdout.splitlines() if x.startswith("@@RSS")), 0.0)
    return r, rss


def check(r: subprocess.CompletedProcess, what: str) -> None:
    if r.returncode:
        raise RuntimeError(f"{what} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def status_mb(key: str, pid: int | str = "self") -> float:
    """A /proc/PID/status memory field (VmHWM, VmRSS, RssAnon) in MB; nan where the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


class Peak:
    """The largest value of ``probe()``, sampled every ``every_s`` seconds in a thread while the block runs
    (a failing probe is skipped: what it reads may be gone for a moment)."""

    def __init__(self, probe: Callable[[], float], every_s: float = 0.5):
        self.probe, self.peak, self._stop = probe, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.peak = max(self.peak, self.probe())
            except Exception:
                pass

    def __enter__(self) -> Peak:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def machine() -> str:
    model = "unknown CPU"
    try:
        model = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                     if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"


# ------------------------------------------------------------------------------ runs and configs
def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(run: Path, yaml_path: Path = TINY_YAML, links: dict[str, Path] | None = None,
                 fresh: bool = True, **sections) -> Path:
    """``yaml_path`` pointed at a run root (emptied first where ``fresh``) and the beer dump, progress off,
    ``sections`` merged in; ``links``: path in the run root -> the folder it links to (data, tiny, ...)."""
    import yaml

    cfg = yaml.safe_load(yaml_path.read_text())
    cfg.update(output_root=str(run), logging={"progress": False})
    cfg["data"]["posts"] = str(BEER)
    cfg = merge(cfg, sections)
    if fresh:
        rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    for name, target in (links or {"data": ROOT / "data", "tiny": ROOT / "tiny"}).items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        if not (run / name).is_symlink():
            (run / name).symlink_to(target)
    path = run / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ensure_root(root: Path = ROOT, model: dict = BENCH_MODEL, data: Path | None = None) -> Path:
    """root/data: ``data`` linked, or the beer dump prepared with configs/tiny.yaml's splits; root/tiny: a
    Llama of ``model``'s shape by the tiny-model kit. Each built once."""
    from stackllama_ds.config import TinyModelConfig
    from stackllama_ds.config_loader import load_config

    cfg = load_config(TINY_YAML, check_files=False)
    root.mkdir(parents=True, exist_ok=True)
    if data is not None and not (root / "data").exists():
        (root / "data").symlink_to(data.resolve())
    elif data is None and not (root / "data" / "DONE").exists():
        from stackllama_ds.data.prepare import prepare

        log("[bench] preparing the beer dump ...")
        prepare(BEER, root / "data", cfg=cfg.data, seed=cfg.seed, log=lambda *a, **k: None)
        (root / "data" / "DONE").write_text("prepare\n")
    marker = root / "tiny" / "BENCH_MODEL.json"
    if not marker.exists() or json.loads(marker.read_text()) != model:
        from stackllama_ds.models.tiny import make_tiny

        log("[bench] building the benchmark model ...")
        make_tiny(root / "data", root / "tiny", seed=0, cfg=TinyModelConfig(**model))
        marker.write_text(json.dumps(model))
    return root


def n_params(model_dir: Path = ROOT / "tiny") -> int:
    s = Shape.of(model_dir)
    tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings")
    return s.n_body() + s.layers * 2 * s.hidden + (1 if tied else 2) * s.vocab * s.hidden + s.hidden


# ------------------------------------------------------------------------------ sides and rounds
Turn = dict  # {"folder", "index", "n"}: a side's place in a round (bench/turns.py)
Side = Callable[[int, Turn], dict]  # (round, turn) -> figures, with "rss"


def rounds(n_rounds: int, sides: dict[str, Side], show: Callable[[dict], str], together: bool = True,
           folder: Path = OUT / "turns") -> dict[str, list[dict]]:
    """Each round runs every side once in fresh processes, so a ratio within a round holds on a noisy
    machine. ``together``: the sides start at once and take turns step by step (bench/turns.py), the first
    side rotating by round; else one after the other, each alone."""
    res: dict[str, list[dict]] = {k: [] for k in sides}
    names = list(sides)

    def go(name: str, i: int, f: Path, idx: int, n: int) -> dict:
        try:
            return sides[name](i, {"folder": str(f), "index": idx, "n": n})
        finally:
            turns.mark_done(f, idx)  # the others stop waiting for this side

    for i in range(n_rounds):
        LOADS.append(load_avg())
        if together:
            order = names[i % len(names):] + names[:i % len(names)]
            turns.setup(folder)
            with ThreadPoolExecutor(len(order)) as ex:
                futs = {n: ex.submit(go, n, i, folder, k, len(order)) for k, n in enumerate(order)}
            out = {n: f.result() for n, f in futs.items()}
        else:
            out = {}
            for k, n in enumerate(names):
                turns.setup(folder / str(k))
                out[n] = go(n, i, folder / str(k), 0, 1)
        for n in names:
            res[n].append(out[n])
            log(f"  {n} round {i + 1}: {show(out[n])}")
    return res


def timed(times: list, warmup: int, drop_last: bool) -> list:
    """The timed steps: the warm-up dropped, and the last where it also evaluates or saves."""
    kept = times[warmup:len(times) - 1 if drop_last else len(times)]
    if not kept:
        raise RuntimeError(f"no timed steps left of {len(times)} (warm-up {warmup})")
    return kept


# ------------------------------------------------------------------------------ peers' venvs
TORCH = "torch==2.13.0"
# trl 1.16: SFTTrainer/RewardTrainer on our transformers; trl 0.11.4: the StackLLaMA run's PPOTrainer
PEER_SPECS: dict[str, tuple[list[str], str]] = {  # name -> (packages, import check)
    "trl116": (["trl==1.16.0", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0",
                "peft==0.21.2", "tokenizers==0.23.3", "psutil"], "from trl import SFTTrainer, RewardTrainer"),
    "trl011": (["trl==0.11.4", "transformers==4.46.3", "accelerate==1.1.1", "datasets==3.1.0", "peft==0.13.2",
                "tokenizers==0.20.3", "numpy<2.3", "psutil", "rich"],
               "from trl import PPOTrainer, PPOConfig, AutoModelForCausalLMWithValueHead"),
}


def peer_python(name: str) -> Path:
    """The python of the peer's venv, set up once. torch goes in first, pinned by a constraints file, or pip
    resolves a CUDA torch; a stamp holding the spec marks the venv ready."""
    pkgs, test = PEER_SPECS[name]
    venv = PEERS / f"venv-{name}"
    py, stamp, spec = venv / "bin" / "python", venv / "READY", "\n".join([TORCH, *pkgs])
    if stamp.exists() and stamp.read_text() == spec:
        return py
    PEERS.mkdir(parents=True, exist_ok=True)
    log(f"[peers] setting up {venv} ({', '.join(pkgs[:2])}) - once, a few minutes")
    cons = PEERS / "constraints.txt"
    cons.write_text(TORCH + "\n")
    pip = [str(py), "-m", "pip", "install", "-q"]
    steps = [] if py.exists() else [[sys.executable, "-m", "venv", str(venv)]]
    for cmd in [*steps, [*pip, TORCH], [*pip, "-c", str(cons), *pkgs], [str(py), "-c", test]]:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
            raise SystemExit(f"peer {name}: `{' '.join(cmd[:5])} ...` failed: {tail}")
    stamp.write_text(spec)
    return py


# ------------------------------------------------------------------------------ FLOPs and the ceiling
@dataclass(frozen=True)
class Shape:
    """A Llama's matmul shapes. FLOPs of n tokens, h of them through the LM head, with L layers, hidden
    H, attention width d = heads x head_dim, KV width d_kv, MLP width I, vocab V, LoRA rank r:
        N_body = L * (H*d + 2*H*d_kv + d*H + 3*H*I)          decoder matmul weights
        N_lora = L * sum_modules r * (d_in + d_out)
        A(n)   = 4 * L * d * n(n+1)/2                        QK^T and PV over the causal pairs
        forward                  F(n, h) = 2*N_body*n + 2*N_lora*n + A(n) + 2*V*H*h
        LoRA train step          T(n, h) = 4*N_body*n + 6*N_lora*n + 3*A(n) + 4*V*H*h
        full fine-tuning step    T(n, h) = 6*N_body*n + 3*A(n) + 6*V*H*h
    A frozen base's backward computes input gradients only; trained weights also their weight gradients;
    attention's backward is 4 matmuls to the forward's 2. Heads of one output (value, score) are left out."""

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
        """(d_in, d_out, count) of each matmul a token passes: q, k+v, o, gate+up, down per layer, LM head."""
        H, L = self.hidden, self.layers
        return [(H, self.d, L), (H, self.d_kv, 2 * L), (self.d, H, L), (H, self.inter, 2 * L),
                (self.inter, H, L), (H, self.vocab, 1)]

    def n_body(self) -> int:
        return sum(i * o * c for i, o, c in self.linears()[:-1])

    def n_lora(self, lora) -> int:
        """LoRA parameters of a ``LoraConfig`` (0 when it is off: full fine-tuning)."""
        if not lora.enabled:
            return 0
        H, d, kv, inter = self.hidden, self.d, self.d_kv, self.inter
        dims = {"q_proj": (H, d), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (d, H),
                "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H)}
        return self.layers * sum(lora.r * sum(dims[t]) for t in lora.target_modules)

    def attn(self, n: int) -> float:
        return 4 * self.layers * self.d * n * (n + 1) / 2

    def fwd(self, n: int, h: int, n_lora: int = 0) -> float:
        """F(n, h)."""
        return 2 * self.n_body() * n + 2 * n_lora * n + self.attn(n) + 2 * self.vocab * self.hidden * h

    def train(self, n: int, h: int, n_lora: int) -> float:
        """T(n, h): LoRA over a frozen base when ``n_lora``, else full fine-tuning."""
        w = 4 if n_lora else 6
        return w * self.n_body() * n + 6 * n_lora * n + 3 * self.attn(n) + w * self.vocab * self.hidden * h


def _best_s(fn: Callable[[], object], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def shape_rate(s: Shape, rows: int, dtype: str, threads: int, head: bool = True, reps: int = 3) -> float:
    """Best-of-reps FLOP/s of F.linear at the step's shapes, FLOP-weighted over the model's matmuls."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    td = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    flops = secs = 0.0
    for d_in, d_out, count in s.linears() if head else s.linears()[:-1]:
        x, w = torch.randn(rows, d_in, dtype=td), torch.randn(d_out, d_in, dtype=td)
        F.linear(x, w)
        flops += 2 * rows * d_in * d_out * count
        secs += _best_s(lambda x=x, w=w: F.linear(x, w), reps) * count
    return flops / secs


def matmul_rate(dtype: str = "bf16", n: int = 2048, threads: int | None = None, reps: int = 5,
                device: str = "cpu") -> float:
    """Best-of-reps FLOP/s of an n^3 matmul (the machine's dense ceiling in that precision)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    td = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    a, b = torch.randn(n, n, dtype=td, device=device), torch.randn(n, n, dtype=td, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None  # CUDA runs asynchronously
    for _ in range(3):
        a @ b
    sync()
    return 2 * n**3 / _best_s(lambda: a @ b, reps, sync)


# ------------------------------------------------------------------------------ tables
def per_round(res: dict[str, list[dict]], cells: Callable[[list[dict]], list]) -> list[list]:
    """Table rows: one per round, ``cells`` of the sides' figures in that round, then a median row: ``cells``
    of each side's medians over the rounds (of "rss": the max), so its ratios are ratios of medians."""
    sides = list(res.values())
    med = [{k: (max if k == "rss" else median)([x[k] for x in s]) for k, v in s[0].items()
            if isinstance(v, (int, float))} for s in sides]
    rows = [[f"round {i + 1}", *cells([s[i] for s in sides])] for i in range(len(sides[0]))]
    return rows + [["median", *cells(med)]]


def compare_table(res: dict[str, list[dict]], key: str, unit: str, title: str, higher_is_better: bool = True,
                  ours: str = "ours") -> str:
    """Rounds and medians of ``key`` per side, our ratio to every other side (ours/peer for a throughput,
    peer/ours for a time: > 1 means ours is better either way), peak RSS per side."""
    names = list(res)
    others, o = [i for i, k in enumerate(names) if k != ours], names.index(ours)
    ratios = [f"{ours}/{names[i]}" if higher_is_better else f"speed-up vs {names[i]}" for i in others]
    head = ["", *(f"{k} {unit}" for k in res), *ratios, *(f"{k} peak RSS MB" for k in res)]
    def cells(x: list[dict]) -> list:
        r = [x[o][key] / x[i][key] if higher_is_better else x[i][key] / x[o][key] for i in others]
        return [*(s[key] for s in x), *r, *(s["rss"] for s in x)]

    return table(head, per_round(res, cells), title)


def table(headers: list[str], rows: list[list], title: str = "") -> str:
    """A GitHub-markdown table (readable in a terminal and pasteable into RESULTS.md)."""
    cells = [list(headers)] + [[_fmt(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [f"| {' | '.join(c.rjust(w[i]) for i, c in enumerate(r))} |" for r in cells]
    lines.insert(1, f"|{'|'.join('-' * (x + 2) for x in w)}|")
    return (f"\n{title}\n" if title else "\n") + "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        return f"{c:.3g}" if abs(c) < 10 else f"{c:,.0f}" if abs(c) >= 1000 else f"{c:.1f}"
    return str(c)


if __name__ == "__main__":
    if sys.argv[1:2] != ["peers"]:
        print(__doc__.split("\n\n")[1])
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    for name in sys.argv[2:] or PEER_SPECS:
        print(f"{name}: {peer_python(name)}")
