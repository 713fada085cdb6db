"""stackllama_ds/logs.py: library output on the console vs. in each rank's log file (issue 24, item 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stackllama_ds import logs
from tests.conftest import FAST_RM, FAST_SFT, REPO, cli_env, fresh_root, run_cli, write_config

# One rank's library noise, as the libraries emit it: bitsandbytes' cast warning through its own
# logger with its own template (bitsandbytes/autograd/_functions.py, logged on every 8-bit matmul),
# transformers' LOAD REPORT and a deprecation, an error, a Python warning, DeepSpeed's print()ed
# memory report inside prints_to_rank_log.
RANK_SCRIPT = r"""
import sys, warnings
from pathlib import Path
import deepspeed  # dist.init imports it before quiet_libraries; its import sets up its logger
import torch
from bitsandbytes.autograd._functions import logger as bnb_logger
from transformers.utils import logging as hf_logging
from stackllama_ds import logs

rank = int(sys.argv[1])
logs.quiet_libraries(rank, Path(sys.argv[2]))
for _ in range(1000):
    bnb_logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.bfloat16)
hf_logging.get_logger("transformers.modeling_utils").warning(
    "LlamaForSequenceClassification LOAD REPORT from: sft/model\nKey | Status\nscore.weight | MISSING")
for _ in range(3):
    hf_logging.get_logger("transformers.utils.generic").warning("`past_key_values` is deprecated")
hf_logging.get_logger("transformers.modeling_utils").error(f"rank {rank}: something failed")
warnings.warn("an old keyword", FutureWarning)
with logs.prints_to_rank_log():
    print("begin bf16_optimizer")
    print("MA 0.51 GB         Max_MA 0.51 GB         CA 0.51 GB         Max_CA 1 GB ")
print("stage output")
"""


def _rank(rank: int, log: Path) -> tuple[str, str, str]:
    r = subprocess.run(
        [sys.executable, "-c", RANK_SCRIPT, str(rank), str(log)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, r.stderr, log.read_text()


def test_noisy_warnings_once_per_rank_on_the_console_and_in_the_rank_log(tmp_path):
    for rank in (0, 1):
        out, err, log = _rank(rank, tmp_path / "logs" / f"rank-{rank}.log")
        # 1000 identical bitsandbytes casts: one console line per rank, FILE_REPEATS in the file
        assert err.count("MatMul8bitLt: inputs will be cast from torch.bfloat16") == 1, err
        assert log.count("MatMul8bitLt: inputs will be cast from torch.bfloat16") == logs.FILE_REPEATS
        # the LOAD REPORT table: rank log only
        assert err.count("LOAD REPORT") == 0 and log.count("LOAD REPORT") == 1
        # a warning every rank repeats: rank 0's console, once; every rank's file
        assert err.count("past_key_values") == (1 if rank == 0 else 0), err
        assert log.count("past_key_values") == 3
        assert err.count("FutureWarning: an old keyword") == (1 if rank == 0 else 0), err
        assert log.count("FutureWarning: an old keyword") == 1
        # errors from every rank
        assert err.count(f"rank {rank}: something failed") == 1 and log.count("something failed") == 1
        # DeepSpeed's print()ed memory report: the file, not stdout; later prints are the stage's
        assert "Max_MA" not in out and "bf16_optimizer" not in out and out.strip() == "stage output"
        assert log.count("Max_MA") == 1 and log.count("begin bf16_optimizer") == 1


def test_rank_log_path():
    assert logs.rank_log(Path("/r/ppo"), 5) == Path("/r/ppo/logs/rank-5.log")


@pytest.mark.slow
def test_stage_console_leaves_load_reports_and_memory_reports_to_the_rank_logs(sft_root, tmp_path):
    """2-rank RM (a reward head is MISSING in each load: LOAD REPORT per rank and in the export) and
    1-step PPO with bf16 ZeRO-0 reference and reward engines (DeepSpeed's BF16 optimizer prints
    "begin bf16_optimizer" and its "MA ... Max_MA" report per engine)."""
    root = fresh_root(sft_root, tmp_path / "run", stages=("sft",))
    rm = {**FAST_RM, "max_steps": 2, "eval_every": 2, "save_every": 2}
    bf16 = {"zero_stage": 0, "dtype": "bf16"}
    ppo = {
        "steps": 1,
        "batch_size": 2,
        "mini_batch_size": 1,
        "ppo_epochs": 1,
        "save_every": 1,
        "response_max_length": 12,
        "reference": bf16,
        "reward": bf16,
    }
    cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=rm, ppo=ppo)
    for stage, noisy in (("rm", "LOAD REPORT"), ("ppo", "Max_MA")):
        r = run_cli(stage, cfg)
        assert r.returncode == 0, r.stderr[-4000:]
        assert (r.stdout + r.stderr).count(noisy) == 0, (r.stdout + r.stderr)[-4000:]
        rank_logs = [(root / stage / "logs" / f"rank-{k}.log").read_text() for k in (0, 1)]
        if stage == "rm":
            assert all(t.count(noisy) >= 1 for t in rank_logs)
        else:  # DeepSpeed prints its memory report on rank 0 only
            assert rank_logs[0].count(noisy) >= 1 and "begin bf16_optimizer" in rank_logs[0]
