"""Helpers for the fault suite: launch the CLI, find a rank's pid, time exits, collect a report table."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO, cli_env, rank_pid, wait_for_step  # noqa: F401  (re-exported for the fault tests)

# One row per fault, printed at the end of the session (run pytest with -s to see it).
REPORT: list[tuple[str, str, str, str]] = []


def record(fault: str, happened: str, exit_s: float | None, lost: str) -> None:
    row = (fault, happened, "-" if exit_s is None else f"{exit_s:.1f} s", lost)
    REPORT.append(row)
    print(f"\n[fault] {fault} | {happened} | time to exit {row[2]} | lost: {lost}", flush=True)


def report_table() -> str:
    lines = ["| fault | what happened | time to exit | lost |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in REPORT]
    return "\n".join(lines)


@dataclass
class Run:
    """A finished CLI launch: exit code, output and wall time."""

    rc: int
    out: str
    err: str
    wall_s: float
    t_end: float


def start(stage: str, cfg: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stackllama_ds.cli", stage, str(cfg), *args],
        cwd=REPO, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(p: subprocess.Popen, t0: float, timeout: float) -> Run:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"no exit within {timeout} s (a hang?):\n{err[-3000:]}") from None
    t_end = time.time()
    return Run(p.returncode, out, err, t_end - t0, t_end)


def run(stage: str, cfg: Path, *args: str, timeout: float = 300, **env: str) -> Run:
    t0 = time.time()
    return finish(start(stage, cfg, *args, **env), t0, timeout)


def rows_of(stage_dir: Path) -> list[dict]:
    p = stage_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def resumes_of(stage_dir: Path) -> list[dict]:
    """The stage's resume records (``layout.RESUMES``), oldest first."""
    from stackllama_ds.run.layout import RESUMES
    from stackllama_ds.run.metrics import read_metrics

    return read_metrics(stage_dir / RESUMES)


def no_traceback(text: str) -> None:
    assert "Traceback (most recent call last)" not in text, text[-3000:]


def ckpt_names(ckpt_root: Path) -> set[str]:
    return {p.name for p in ckpt_root.iterdir()} if ckpt_root.is_dir() else set()
