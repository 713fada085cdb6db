"""Rank-0 logging: ``metrics.jsonl`` (every row), a progress bar, and wandb when enabled.

``log_every`` (the stage's ``log_every``) thins what reaches the progress bar and wandb only:
metrics.jsonl keeps every step, since resume, report and the tests read it.
wandb is imported only when enabled; ``WANDB_MODE=offline`` works without an account.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from stackllama_ds.config import LoggingConfig
from stackllama_ds.engines import dist
from stackllama_ds.fsutil import write_atomic


def read_metrics(path: str | os.PathLike[str]) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill mid-write
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows after ``last_step`` (a resume), so the file never shows a step twice."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return v


class MetricsLogger:
    """Append one JSON object per row to ``<stage>/metrics.jsonl`` on rank 0; mirror to bar and wandb.

    A row is mirrored when its step is a multiple of ``log_every``, the first or the last step of
    this run, or when it holds held-out figures (``eval_*``): those come every ``eval_every`` steps
    and would otherwise be dropped when the two periods do not line up.
    """

    def __init__(
        self,
        stage_dir: Path,
        stage: str,
        cfg: LoggingConfig,
        total_steps: int,
        start_step: int = 0,
        run_name: str | None = None,
        config: dict | None = None,
        bar_keys: tuple[str, ...] = ("loss", "tokens_per_s"),
        log_every: int = 1,
    ):
        if log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {log_every}")
        self.main = dist.is_main()
        self.log_every = log_every
        self.first_step = start_step + 1
        self.total_steps = total_steps
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        self.bar_keys = bar_keys
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True, mininterval=1.0)
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project,
                group=cfg.wandb_group or run_name,
                name=f"{run_name or 'run'}-{stage}",
                job_type=stage,
                dir=str(self.path.parent),
                config=config,
                resume="allow",
                id=f"{(run_name or 'run').replace('/', '_')}-{stage}",
            )

    def log(self, row: dict[str, Any], advance: bool = True) -> None:
        if not self.main:
            return
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.bar is not None and advance:
            self.bar.update(1)  # the bar counts every step; only its figures follow log_every
        if not self.mirrored(row):
            return
        if self.bar is not None:
            shown = {k: row[k] for k in self.bar_keys if k in row and isinstance(row[k], int | float)}
            if shown:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=row.get("step"))

    def mirrored(self, row: dict[str, Any]) -> bool:
        """Whether ``row`` goes to the bar and wandb as well as metrics.jsonl (see the class docstring)."""
        step = row.get("step")
        if not isinstance(step, int) or self.log_every == 1:
            return True
        return (step % self.log_every == 0 or step in (self.first_step, self.total_steps)
                or any(k.startswith("eval_") for k in row))

    def text(self, msg: str) -> None:
        """A line for the log (rank 0), printed above the progress bar."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
