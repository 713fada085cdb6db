"""Library output on the console vs. in each rank's log file.

    quiet_libraries(rank, rank_log(cfg.stage_dir(stage), rank))  # entry.setup, once per rank

Every record the libraries log (transformers, DeepSpeed, bitsandbytes, peft, accelerate) and every
Python warning (``warnings.warn``, via the ``py.warnings`` logger), INFO and up, goes to
``<stage>/logs/rank-R.log``. The console keeps what an operator needs:

- WARNING and up, each warning kind (logger and message template) once per rank: bitsandbytes logs
  "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16" on every 8-bit matmul, ~1M
  lines per PPO step over 24 ranks;
- transformers', DeepSpeed's and Python's warnings from rank 0 only (every rank would repeat them;
  errors still come from every rank);
- no transformers "LOAD REPORT" table (one per model load and rank; a reward model's fresh
  ``score`` head is always MISSING there);
- no DeepSpeed memory report ("begin bf16_optimizer", "MA ... Max_MA ..."): print() calls inside
  ``deepspeed.initialize``, which ``engines`` runs under ``prints_to_rank_log``.

The file keeps the first ``FILE_REPEATS`` of exactly the same warning (logger, template and
arguments), so that the bitsandbytes cast warning does not fill the disk instead of the console.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

LIBRARIES = ("transformers", "DeepSpeed", "bitsandbytes", "peft", "accelerate", "py.warnings")  # loggers
RANK0_WARNINGS = ("transformers", "DeepSpeed", "py.warnings")  # other ranks show only their errors
FILE_REPEATS = 10  # the rank's file keeps an exact repeat of a warning (same arguments) 10 times
FILE_ONLY = ("LOAD REPORT",)  # records that hold one of these go to the rank's file, never the console
LOGS = "logs"  # <stage>/logs/rank-R.log

_file: logging.FileHandler | None = None  # this process's rank log, once quiet_libraries ran


def rank_log(stage_dir: Path, rank: int) -> Path:
    return Path(stage_dir) / LOGS / f"rank-{rank}.log"


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip()  # a captured warning ends in a newline


class _Repeats(logging.Filter):
    """Pass a warning only the first ``limit`` times its key is seen in this process."""

    def __init__(self, limit: int, with_args: bool):
        super().__init__()
        self.limit, self.with_args = limit, with_args
        self.seen: dict[tuple, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key: tuple = (record.name, str(record.msg))
        if self.with_args:
            key += (repr(record.args),)
        n = self.seen[key] = self.seen.get(key, 0) + 1
        return n <= self.limit


class _Console(_Repeats):
    """Console: no FILE_ONLY record; each warning kind once, whatever its arguments."""

    def __init__(self):
        super().__init__(limit=1, with_args=False)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(s in msg for s in FILE_ONLY) and super().filter(record)


def quiet_libraries(rank: int, log_file: Path) -> Path:
    """Send the libraries' full logs to ``log_file`` and keep the console to what an operator needs
    (module docstring). Call once per rank after ``dist.init`` (which imports deepspeed: DeepSpeed
    sets up its own logger on import and would undo this). Calling again moves the file."""
    global _file
    try:  # transformers, too, installs its console handler on first use: have it do so now
        from transformers.utils import logging as hf_logging

        hf_logging.get_verbosity()
    except ImportError:
        pass
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(log_file, encoding="utf-8")  # appends: a requeued job keeps the earlier runs
    fh.setLevel(logging.INFO)
    fh.setFormatter(_Format(f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s"))
    fh.addFilter(_Repeats(FILE_REPEATS, with_args=True))
    logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger (after Python's own dedup)
    console = _Console()
    for name in LIBRARIES:
        lg = logging.getLogger(name)
        if _file is not None:
            lg.removeHandler(_file)
        lg.setLevel(logging.INFO)
        streams = [h for h in lg.handlers if type(h) is logging.StreamHandler]
        if not streams:  # it propagates to the root logger, whose last resort prints WARNING+ to stderr
            h = logging.StreamHandler(sys.stderr)
            prefix = "" if name == "py.warnings" else f"[rank {rank}] [{name}] "
            h.setFormatter(_Format(prefix + "%(message)s"))
            lg.addHandler(h)
            lg.propagate = False
            streams = [h]
        for h in streams:
            h.setLevel(logging.ERROR if rank != 0 and name in RANK0_WARNINGS else logging.WARNING)
            h.filters = [f for f in h.filters if not isinstance(f, _Repeats)] + [console]
        lg.addHandler(fh)
    if _file is not None:
        _file.close()
    _file = fh
    return log_file


@contextlib.contextmanager
def prints_to_rank_log() -> Iterator[None]:
    """Send what library code print()s meanwhile to the rank's log file (the console before
    ``quiet_libraries``): DeepSpeed prints its memory report on building an engine."""
    if _file is None:
        yield
        return
    with contextlib.redirect_stdout(_file.stream):
        try:
            yield
        finally:
            _file.stream.flush()
