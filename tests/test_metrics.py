"""MetricsLogger: metrics.jsonl keeps every row; log_every thins only the bar and wandb."""

from __future__ import annotations

import pytest

from stackllama_ds.config import LoggingConfig
from stackllama_ds.run.metrics import MetricsLogger, read_metrics


class _Recorder:
    """Stands in for the wandb run and the tqdm bar: records what reached them."""

    def __init__(self) -> None:
        self.logged: list[int] = []
        self.postfix: list[dict] = []
        self.updates = 0

    def log(self, row: dict, step: int | None = None) -> None:
        self.logged.append(step)

    def set_postfix(self, shown: dict, refresh: bool = False) -> None:
        self.postfix.append(shown)

    def update(self, n: int) -> None:
        self.updates += n


def _logger(tmp_path, log_every: int, start_step: int = 0, total: int = 10) -> tuple[MetricsLogger, _Recorder]:
    log = MetricsLogger(tmp_path, "sft", LoggingConfig(progress=False), total, start_step, log_every=log_every)
    rec = _Recorder()
    log.wandb = rec
    log.bar = rec
    return log, rec


def test_log_every_thins_bar_and_wandb_not_the_file(tmp_path):
    log, rec = _logger(tmp_path, log_every=4)
    for step in range(1, 11):
        row = {"step": step, "loss": 1.0 / step}
        if step == 6:
            row["eval_loss"] = 0.5  # held-out figures always reach wandb
        log.log(row)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 11))
    assert rec.logged == [1, 4, 6, 8, 10]  # first, multiples of 4, the eval row, the last
    assert len(rec.postfix) == 5 and rec.updates == 10  # the bar still advances every step


def test_resumed_run_shows_its_first_step(tmp_path):
    log, rec = _logger(tmp_path, log_every=5, start_step=6, total=12)
    for step in range(7, 13):
        log.log({"step": step, "loss": 0.1})
    assert rec.logged == [7, 10, 12]


def test_default_mirrors_every_row(tmp_path):
    log, rec = _logger(tmp_path, log_every=1)
    for step in range(1, 4):
        log.log({"step": step, "loss": 0.1})
    assert rec.logged == [1, 2, 3]


def test_log_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="log_every"):
        MetricsLogger(tmp_path, "sft", LoggingConfig(progress=False), 10, log_every=0)
