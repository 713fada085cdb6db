"""The data path at scale: prepare's throughput, and the SFT data path's memory per rank (issue 15).

    python bench/data_bench.py prepare --sizes 100,1000 --workers 1,2   # MB/s, peak RSS; markdownify baseline
    python bench/data_bench.py sft-rss --sizes 250,1000                 # peak RSS per rank of SFT's data

A size's Posts.xml repeats the beer dump's rows with fresh Ids and the repeat's number in each Title, so
the SFT texts stay distinct. prepare: one fresh process per case (MB/s, peak RSS of the main process and
of the largest worker, MB per CPU-second); the baseline converts with markdownify. sft-rss: prepare, then
``stackllama-ds sft`` on 2 ranks for one step (builds the token cache; each rank's VmHWM polled from /proc)
and resumed for a second (reads it), then the data path alone as rank 0 of 2, "old" (the list-based code
in tests/stages/_packing_ref.py) and "new" (the memory-mapped cache), to the first micro batch and to that
of a resume half a pass in. The tiny model is built once from the beer dump, not from the large dumps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402

_IDS = re.compile(rb'( (?:Id|ParentId|AcceptedAnswerId)=")(\d+)"')
_TITLE = re.compile(rb'( Title="[^"]*)"')
SEQ, MICRO, WORLD = 256, 4, 2  # configs/tiny.yaml's SFT


def build_dump(src: Path, dest: Path, size_mb: int) -> Path:
    """Repeat src's rows with Ids shifted by rep x (max Id + 1) and " [rN]" added to titles, to size_mb."""
    if dest.exists() and dest.stat().st_size >= size_mb * 1e6:
        return dest
    rows = [ln.strip() for ln in src.read_bytes().split(b"\n") if ln.strip().startswith(b"<row")]
    span = max(int(m.group(2)) for r in rows for m in _IDS.finditer(r)) + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<posts>\r\n')
        written, rep = 0, 0
        while written < size_mb * 1_000_000:
            off, tag = rep * span, f" [r{rep}]".encode()
            block = b"".join(
                b"  " + _TITLE.sub(lambda m, tag=tag: m.group(1) + tag + b'"', _IDS.sub(
                    lambda m, off=off: m.group(1) + str(int(m.group(2)) + off).encode() + b'"', r)) + b"\r\n"
                for r in rows
            )
            f.write(block)
            written += len(block)
            rep += 1
        f.write(b"</posts>")
    os.replace(tmp, dest)
    return dest


# ------------------------------------------------------------------- prepare's throughput
_CASE = r"""
import json, resource, sys, time
from stackllama_ds.data import markdown
from stackllama_ds.data.prepare import prepare
posts, out, workers, baseline = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
if baseline:  # markdownify: the dev extra, never a run-time converter
    from markdownify import markdownify
    markdown._CONVERTER = ("markdownify", lambda h: markdownify(h, heading_style="ATX", code_language="",
                                                                 bullets="-"))
t = time.perf_counter()
rep = prepare(posts, out, workers=workers, log=lambda *a: None)
dt = time.perf_counter() - t
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": dt, "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                  "rss_main_mb": me.ru_maxrss / 1024, "rss_worker_mb": kids.ru_maxrss / 1024,
                  "pairs": rep["pairs"], "converter": rep["converter"]}))
"""


def last_json(cmd: list[str], what: str, timeout: float | None = None) -> dict:
    """A fresh process's last stdout line, as JSON."""
    r = subprocess.run(cmd, cwd=h.REPO, env=h.env(), capture_output=True, text=True, timeout=timeout)
    h.check(r, what)
    return json.loads(r.stdout.strip().splitlines()[-1])


def prepare_case(posts: Path, out: Path, workers: int, baseline: bool) -> dict:
    r = last_json([sys.executable, "-c", _CASE, str(posts), str(out), str(workers), str(int(baseline))],
                  f"prepare ({posts}, workers={workers}, baseline={baseline})")
    h.rmtree(out)
    return r


def bench_prepare(a) -> None:
    rows = []
    for size in [int(s) for s in a.sizes.split(",")]:
        # the site name is the folder name, as for a real dump
        posts = build_dump(h.BEER, a.workdir / f"bench{size}.stackexchange.com" / "Posts.xml", size)
        mb = posts.stat().st_size / 1e6
        base = None if a.no_baseline else prepare_case(posts, a.workdir / "out-base", 1, True)
        for w in [int(x) for x in a.workers.split(",")]:
            r = prepare_case(posts, a.workdir / f"out-{w}", w, False)
            if base is not None and r["pairs"] != base["pairs"]:
                h.log(f"  note: pair count differs from the baseline's ({r['pairs']} vs {base['pairs']})")
            b = [mb / base["seconds"], max(base["rss_main_mb"], base["rss_worker_mb"]),
                 base["seconds"] / r["seconds"]] if base else [float("nan")] * 3
            rows.append([mb, w, mb / r["seconds"], r["seconds"], mb / r["cpu_s"], r["rss_main_mb"],
                         r["rss_worker_mb"], *b])
            h.log(f"  {size} MB workers={w}: {mb / r['seconds']:.1f} MB/s")
    print(h.table(["size MB", "workers", "MB/s", "s", "MB/cpu-s", "RSS main MB", "RSS worker MB", "base MB/s",
                   "base RSS MB", "speed-up"], rows,
                  f"prepare: {h.machine()}; converter html-to-markdown; baseline markdownify, 1 process"))


# ------------------------------------------------------------------- the SFT data path's memory
def run_sft(cfg: Path, *extra: str) -> dict:
    """One ``stackllama-ds sft`` launch: peak VmHWM per rank, seconds to the first new metrics row."""
    import psutil

    from stackllama_ds.run.metrics import read_metrics

    metrics = cfg.parent / "sft" / "metrics.jsonl"
    before = len(read_metrics(metrics)) if metrics.exists() else 0
    out = cfg.parent / f"sft-{before}.log"
    t0 = time.perf_counter()
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "stackllama_ds.cli", "sft", str(cfg), *extra],
                                cwd=h.REPO, env=h.env(), stdout=log, stderr=subprocess.STDOUT)
        peak: dict[int, float] = {}
        first = None
        while proc.poll() is None:
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                kids = []
            for p in kids:
                try:
                    rank = p.environ().get("RANK")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                mb = h.status_mb("VmHWM", p.pid)
                if rank is not None and mb == mb:  # nan: the rank is gone
                    peak[int(rank)] = max(peak.get(int(rank), 0.0), mb)
            if first is None and metrics.exists() and len(read_metrics(metrics)) > before:
                first = time.perf_counter() - t0
            time.sleep(0.2)
    text = out.read_text()
    h.check(subprocess.CompletedProcess(proc.args, proc.returncode, text, text), f"sft {cfg}")
    m = re.search(r"tokenized (\d+) texts \((\d+) tokens\) of sft into .* in ([\d.]+) s", text)
    return {"peak": [peak.get(r, float("nan")) for r in range(WORLD)], "first_step_s": first,
            "total_s": time.perf_counter() - t0, "tokenize_s": float(m.group(3)) if m else None,
            "texts": int(m.group(1)) if m else None}


def data_path(root: Path, path: str, resume_at: int) -> None:
    """Rank 0 of 2's SFT data path, old or new, in this process; prints one JSON line (seconds, MB)."""
    import datasets  # noqa: F401  (the old path's load_prepared imports it: an import is not data)

    from stackllama_ds.data import packing
    from stackllama_ds.data.prepare import load_prepared, sft_texts
    from stackllama_ds.data.tokens import sft_tokens
    from stackllama_ds.models.load import load_tokenizer
    from tests.stages import _packing_ref as ref

    tok = load_tokenizer(root / "tiny")
    base = h.status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts here: imports' peak left out
    t0 = time.perf_counter()
    if path == "old":
        data, code = load_prepared(root / "data"), ref
        texts, held = sft_texts(data["sft"]), sft_texts(data["rm_eval"])
    else:
        texts, held = (sft_tokens(root / "data", s, tok, build=False) for s in ("sft", "rm_eval"))
        code = packing
    code.eval_batches(held, tok, SEQ, MICRO, 0, WORLD, 1)
    next(code.packed_batches(texts, tok, SEQ, MICRO, 0, WORLD, 0))
    t1 = time.perf_counter()
    next(code.packed_batches(texts, tok, SEQ, MICRO, 0, WORLD, 0, start=resume_at))
    t2 = time.perf_counter()
    print(json.dumps({"base_mb": base, "peak_mb": h.status_mb("VmHWM"), "first_s": t1 - t0,
                      "resume_s": t2 - t1}))


def bench_sft_rss(a) -> None:
    from stackllama_ds.config_loader import load_config

    work = a.workdir.resolve()
    tiny = h.ensure_root(work, load_config(h.TINY_YAML, check_files=False).model.tiny.model_dump()) / "tiny"
    rows, paths = [], []
    for size in [int(s) for s in a.sizes.split(",")]:
        posts = build_dump(h.BEER, work / f"posts-{size}MB" / "Posts.xml", size)
        run = work / f"run-{size}MB"
        # the size's run root is kept (a rerun may reuse its prepared data): fresh=False
        cfg = h.write_config(run, h.TINY_YAML, {"tiny": tiny}, fresh=False, data={"posts": str(posts)},
                             sft={"max_steps": 1, "save_every": 1000, "eval_every": 1000, "eval_batches": 1})
        prep_json = run / "prepare.json"
        if a.reuse_prepared and prep_json.exists() and (run / "data" / "report.json").exists():
            prep = json.loads(prep_json.read_text())
            h.rmtree(run / "data" / "tokens")  # the first start builds it again
        else:
            h.log(f"[{size} MB] prepare ...")
            r, rss = h.run_measured([sys.executable, "-m", "stackllama_ds.cli", "prepare", "--config",
                                     str(cfg), "--posts", str(posts), "--out", str(run / "data"), "--workers",
                                     a.workers.split(",")[-1]], timeout=7200)
            h.check(r, "prepare")
            report = json.loads((run / "data" / "report.json").read_text())
            prep = {"seconds": report["seconds"], "peak_mb": rss}
            prep_json.write_text(json.dumps(prep))
        h.rmtree(run / "sft")  # a rerun of this script starts from step 0 again
        h.log(f"[{size} MB] sft: first start (tokenizes) ...")
        first = run_sft(cfg)
        h.log(f"[{size} MB] sft: resume for step 2 (cache hit) ...")
        again = run_sft(cfg, "--set", "sft.max_steps=2")
        (meta_path,) = (run / "data" / "tokens").glob("sft-*/meta.json")
        meta = json.loads(meta_path.read_text())
        resume_at = meta["n_tokens"] // SEQ // 2 // (MICRO * WORLD) * (MICRO * WORLD)  # half a pass in
        rows.append([size, posts.stat().st_size / 1e6, prep["seconds"], prep["peak_mb"], meta["n_texts"],
                     meta["n_tokens"] / 1e6, first["tokenize_s"], first["first_step_s"], *first["peak"],
                     again["first_step_s"], *again["peak"], again["tokenize_s"] is None])
        h.log(f"  {rows[-1]}")
        for path in ("new",) if a.skip_old else ("new", "old"):
            h.log(f"[{size} MB] data path {path} ...")
            d = last_json([sys.executable, __file__, "sft-rss", "--data-path", path, "--root", str(run),
                           "--resume-at", str(resume_at)], f"data path {path}", timeout=3600)
            paths.append([size, path, d["base_mb"], d["peak_mb"], d["peak_mb"] - d["base_mb"], d["first_s"],
                          d["resume_s"]])
            h.log(f"  {paths[-1]}")
    print(f"# SFT data: {h.machine()}; tiny model (configs/tiny.yaml), seq {SEQ}, micro {MICRO}, "
          f"{WORLD} ranks, ZeRO-2; prepare --workers {a.workers.split(',')[-1]}")
    print(h.table(
        ["size MB", "Posts.xml MB", "prepare s", "prepare peak MB", "SFT texts", "tokens M", "tokenize s",
         "start -> step 1 s", "rank 0 peak MB", "rank 1 peak MB", "resume -> step 2 s", "rank 0 peak MB",
         "rank 1 peak MB", "resume re-tokenized nothing"],
        rows, "Prepare, then SFT on 2 ranks: first start (builds the cache), then a resume (reads it)"))
    print(h.table(["size MB", "data path", "base MB", "peak MB", "data MB", "to first batch s",
                   "to resume batch s"], paths,
                  "The data path alone as rank 0 of 2 (held-out batches, first micro batch; then a resume "
                  "half a pass in)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["prepare", "sft-rss"])
    ap.add_argument("--sizes", default="250,1000", help="Posts.xml sizes in MB")
    ap.add_argument("--workers", default="2", help="prepare's parse workers (prepare: comma-separated cases)")
    ap.add_argument("--workdir", type=Path, default=h.OUT / "data_bench")
    ap.add_argument("--no-baseline", action="store_true", help="prepare: skip the slow markdownify baseline")
    ap.add_argument("--skip-old", action="store_true", help="sft-rss: do not run the old data path")
    ap.add_argument("--reuse-prepared", action="store_true",
                    help="sft-rss: keep each size's prepared data and figures from an earlier run")
    ap.add_argument("--data-path", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--resume-at", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.data_path:
        return data_path(a.root, a.data_path, a.resume_at)
    (bench_prepare if a.what == "prepare" else bench_sft_rss)(a)


if __name__ == "__main__":
    main()
