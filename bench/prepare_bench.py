"""Throughput and peak memory of ``prepare`` on large synthetic dumps built from real rows.

    python bench/prepare_bench.py --sizes 100,400 --workers 1,2

For each size (MB) we write a Posts.xml by repeating the rows of a real dump (default: the beer dump
shipped in data/) with fresh Ids, remapping ParentId and AcceptedAnswerId consistently, then run
``prepare`` in a fresh subprocess per case and report MB/s and peak RSS (the main process and the
largest worker, from getrusage inside that subprocess) and MB per CPU-second (all processes; robust
to other load on the machine). The baseline is the same pipeline with
markdownify (the dev extra) as the converter, one process. Files are cached in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_IDS = re.compile(rb'( (?:Id|ParentId|AcceptedAnswerId)=")(\d+)"')


def build_dump(src: Path, dest: Path, size_mb: int) -> Path:
    """Repeat src's rows with Ids shifted by a multiple of (max Id + 1) until dest is size_mb."""
    if dest.exists() and dest.stat().st_size >= size_mb * 1e6:
        return dest
    rows = [ln.strip() for ln in src.read_bytes().split(b"\n") if ln.strip().startswith(b"<row")]
    span = max(int(m.group(2)) for r in rows for m in _IDS.finditer(r)) + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    target = size_mb * 1_000_000
    with open(tmp, "wb") as f:
        f.write(b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<posts>\r\n')
        written, rep = 0, 0
        while written < target:
            off = rep * span
            block = b"".join(
                b"  " + _IDS.sub(lambda m, off=off: m.group(1) + str(int(m.group(2)) + off).encode() + b'"', r)
                + b"\r\n"
                for r in rows
            )
            f.write(block)
            written += len(block)
            rep += 1
        f.write(b"</posts>")
    os.replace(tmp, dest)
    return dest


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
me = resource.getrusage(resource.RUSAGE_SELF)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
print(json.dumps({"seconds": dt, "cpu_s": cpu, "rss_main_mb": me.ru_maxrss / 1024,
                  "rss_worker_mb": kids.ru_maxrss / 1024,
                  "pairs": rep["pairs"], "converter": rep["converter"]}))
"""


def run_case(posts: Path, out: Path, workers: int, baseline: bool) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CASE, str(posts), str(out), str(workers), "1" if baseline else "0"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode:
        raise RuntimeError(f"case failed ({posts}, workers={workers}):\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=REPO / "data/beer.stackexchange.com/Posts.xml")
    ap.add_argument("--sizes", default="100,1000", help="comma-separated sizes in MB")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stackllama_ds_bench"))
    ap.add_argument("--baseline-max-mb", type=int, default=10_000,
                    help="skip the (slow) markdownify baseline above this size")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    header = (f"{'size MB':>8} {'workers':>7} {'MB/s':>7} {'s':>7} {'MB/cpu-s':>8} {'RSS main MB':>11} "
              f"{'RSS worker MB':>13} "
              f"{'base MB/s':>9} {'base RSS MB':>11} {'speedup':>7}")
    print(f"converter: html-to-markdown; baseline: markdownify, 1 process; cpus: {os.cpu_count()}", flush=True)
    for size in sizes:
        # The site name is the folder name, as for a real dump.
        posts = build_dump(args.src, args.workdir / f"bench{size}.stackexchange.com" / "Posts.xml", size)
        mb = posts.stat().st_size / 1e6
        base = None
        if not args.no_baseline and size <= args.baseline_max_mb:
            t = time.perf_counter()
            base = run_case(posts, args.workdir / "out-base", 1, baseline=True)
            print(f"  baseline {size} MB done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        for w in workers:
            r = run_case(posts, args.workdir / f"out-{w}", w, baseline=False)
            if base is not None and r["pairs"] != base["pairs"]:
                print(f"  note: pair count differs from baseline ({r['pairs']} vs {base['pairs']})", file=sys.stderr)
            rows.append((mb, w, r, base))
            print(f"  {size} MB workers={w}: {mb / r['seconds']:.1f} MB/s", file=sys.stderr, flush=True)
    print(header)
    for mb, w, r, base in rows:
        bs = f"{mb / base['seconds']:9.1f} {max(base['rss_main_mb'], base['rss_worker_mb']):11.0f} " \
             f"{base['seconds'] / r['seconds']:6.1f}x" if base else f"{'-':>9} {'-':>11} {'-':>7}"
        print(f"{mb:8.0f} {w:7d} {mb / r['seconds']:7.1f} {r['seconds']:7.1f} {mb / r['cpu_s']:8.1f} "
              f"{r['rss_main_mb']:11.0f} "
              f"{r['rss_worker_mb']:13.0f} {bs}")


if __name__ == "__main__":
    main()
