"""Checkpoints: atomic save, verification, cleanup of half-written saves, and exact resume of SFT.

    python -m pytest tests/stages/test_checkpoint.py -q

Unit tests drive checkpoint.py with a stand-in engine in one process (no process group). The slow
tests share one uninterrupted 2-rank fp32 ZeRO-3 SFT run (the reference; its export also shows
that ZeRO-3 exports full weights) and one run root that is interrupted three ways in a row:
SIGUSR1 to the launcher (exit 75), SIGKILL of rank 1, and rank 0 killed mid-save
(STACKLLAMA_FAULT=ckpt_between_files); the final run must reproduce the reference's losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stackllama_ds.fsutil import sha256_file
from stackllama_ds.run.checkpoint import (
    MANIFEST,
    CheckpointError,
    TrainState,
    cleanup_partial,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from stackllama_ds.run.signals import StopSignal
from tests.conftest import (
    REPO,
    assert_resumed_at,
    cli_env,
    fresh_root,
    rank_pid,
    run_cli,
    wait_for_step,
    write_config,
)


# ------------------------------------------------------------------------- unit: one process
class FakeEngine:
    """The two DeepSpeedEngine methods checkpoint.py uses; the 'weights' are one tensor."""

    def __init__(self, value: float = 0.0):
        self.w = torch.full((4,), value)

    def save_checkpoint(self, save_dir, tag, save_latest=False, exclude_frozen_parameters=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": self.w}, d / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, load_module_strict=True, custom_load_fn=None):
        f = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        if not f.exists():
            return None, None
        self.w = torch.load(f)["w"]
        return str(f), {}


def _save(root: Path, step: int, keep_last: int = 2, value: float | None = None) -> Path:
    eng = FakeEngine(float(step) if value is None else value)
    return save_checkpoint(
        {"model": eng}, root, TrainState(step=step, samples=8 * step), keep_last, {"kind": "x"}
    )


def test_save_is_complete_and_load_restores(tmp_path):
    ckpt = _save(tmp_path, 3)
    assert ckpt.name == "step-3" and not list(tmp_path.glob(".tmp-*"))
    m = verify_checkpoint(ckpt)
    assert m["complete"] and m["step"] == 3 and m["world_size"] == 1
    assert {"model/ds/mp_rank_00_model_states.pt", "rng/rank-0.pt", "state.pt"} <= set(m["files"])
    eng = FakeEngine()
    state, client = load_checkpoint({"model": eng}, ckpt)
    assert state.step == 3 and state.samples == 24 and client == {"kind": "x"}
    assert torch.equal(eng.w, torch.full((4,), 3.0))


def test_manifest_lists_files_another_ranks_listing_saw(tmp_path, monkeypatch):
    """A shared-FS listing here can miss a file another node has just written (attribute caches):
    the manifest lists the union of the ranks' listings and hashes each file by name."""
    from stackllama_ds.engines import dist

    weights = "model/ds/mp_rank_00_model_states.pt"
    real_rglob, real_gather = Path.rglob, dist.all_gather_object
    monkeypatch.setattr(Path, "rglob", lambda self, pat: (p for p in real_rglob(self, pat)
                                                           if not str(p).endswith(weights)))

    def gather(obj):  # a second rank (the writer) whose listing has the file
        if isinstance(obj, list) and all(isinstance(x, str) for x in obj):
            return [obj, [*obj, weights]]
        return real_gather(obj)

    monkeypatch.setattr(dist, "all_gather_object", gather)
    ckpt = _save(tmp_path, 2)
    monkeypatch.undo()
    m = verify_checkpoint(ckpt)
    assert weights in m["files"] and m["files"][weights] == sha256_file(ckpt / weights)


def test_rng_is_restored(tmp_path):
    torch.manual_seed(5)
    ckpt = _save(tmp_path, 1)
    after_save = torch.rand(3)
    torch.manual_seed(999)
    load_checkpoint({"model": FakeEngine()}, ckpt)
    assert torch.equal(torch.rand(3), after_save)


def test_keep_last(tmp_path):
    for s in (2, 4, 6, 8):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-6", "step-8"]


@pytest.mark.parametrize("victim", ["state.pt", "rng/rank-0.pt", "model/ds/mp_rank_00_model_states.pt"])
def test_altered_file_is_refused_naming_it(tmp_path, victim):
    ckpt = _save(tmp_path, 4)
    f = ckpt / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checksum mismatch in {victim}"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=victim):
        load_checkpoint({"model": FakeEngine()}, ckpt)


def test_missing_file_is_refused_naming_it(tmp_path):
    ckpt = _save(tmp_path, 4)
    (ckpt / "rng" / "rank-0.pt").unlink()
    with pytest.raises(CheckpointError, match="file missing: rng/rank-0.pt"):
        verify_checkpoint(ckpt)


def test_resume_refuses_altered_checkpoint(tmp_path):
    from stackllama_ds.run.stage import resume

    ckpt = _save(tmp_path, 2)
    (ckpt / "state.pt").write_bytes(b"not what was saved")
    with pytest.raises(CheckpointError, match="state.pt"):
        resume({"model": FakeEngine()}, tmp_path, log=lambda *_: None)


def test_half_written_checkpoints_are_ignored_and_cleaned(tmp_path):
    good = _save(tmp_path, 2)
    # A save killed before the manifest: the .tmp folder; a step folder whose manifest is cut short.
    (tmp_path / ".tmp-step-4" / "model").mkdir(parents=True)
    (tmp_path / ".tmp-step-4" / "state.pt").write_bytes(b"x")
    bad = tmp_path / "step-6"
    bad.mkdir()
    (bad / MANIFEST).write_text('{"complete": tr')
    wrong = tmp_path / "step-8"  # a manifest that names another step
    wrong.mkdir()
    (wrong / MANIFEST).write_text(json.dumps({"complete": True, "step": 7, "files": {}}))
    assert latest_checkpoint(tmp_path) == good
    removed = {p.name for p in cleanup_partial(tmp_path)}
    assert removed == {".tmp-step-4", "step-6", "step-8"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]


def test_save_error_keeps_previous_and_names_it(tmp_path):
    prev = _save(tmp_path, 2)

    class Failing(FakeEngine):
        def save_checkpoint(self, save_dir, tag, save_latest=False, exclude_frozen_parameters=False):
            raise OSError(28, "No space left on device", str(save_dir))

    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint kept"):
        save_checkpoint({"model": Failing()}, tmp_path, TrainState(step=4), 2)
    assert latest_checkpoint(tmp_path) == prev and not list(tmp_path.glob(".tmp-*"))


def test_stop_signal_sets_flag():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopSignal()
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.requested() and stop.signum == signal.SIGUSR1
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- end to end: 2-rank SFT runs
N_STEPS = 16
RESUME_SFT = {
    "seq_length": 128,
    "max_steps": N_STEPS,
    "save_every": 3,
    "eval_every": 8,
    "engine": {"zero_stage": 3, "dtype": "fp32", "stage3_param_persistence_threshold": 0},
}
LOSS_TOL = 1e-5  # fp32, same world size and batches: a resumed step differs only by reduction order


def rows_of(root: Path) -> list[dict]:
    p = root / "sft" / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def launch(cfg: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stackllama_ds.cli", "sft", str(cfg), *args],
        cwd=REPO,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_losses_match(got: list[dict], ref: list[dict], steps) -> None:
    by_step = {r["step"]: r for r in ref}
    for r in got:
        if r["step"] in steps:
            assert abs(r["loss"] - by_step[r["step"]]["loss"]) <= LOSS_TOL, (r, by_step[r["step"]])
            if "eval_loss" in by_step[r["step"]]:
                assert abs(r["eval_loss"] - by_step[r["step"]]["eval_loss"]) <= LOSS_TOL


@pytest.fixture(scope="module")
def reference(prepared_root, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank fp32 run under partitioned ZeRO-3."""
    root = fresh_root(prepared_root, tmp_path_factory.mktemp("sft_ref"))
    cfg = write_config(root / "cfg.yaml", root, sft=RESUME_SFT)
    r = run_cli("sft", cfg)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


@pytest.mark.slow
def test_resume_after_signal_kill_and_half_written_save(reference, prepared_root, tmp_path):
    ref = rows_of(reference)
    assert [r["step"] for r in ref] == list(range(1, N_STEPS + 1))
    root = fresh_root(prepared_root, tmp_path / "run")
    cfg = write_config(root / "cfg.yaml", root, sft=RESUME_SFT)
    ckpts = root / "sft" / "checkpoints"

    # 1. SIGUSR1 to the launcher: it forwards to the ranks, they checkpoint the step and exit 75.
    p = launch(cfg)
    wait_for_step(root / "sft", 2, p)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 75, err[-3000:]
    k1 = rows_of(root)[-1]["step"]
    assert k1 < N_STEPS, "the signal came too late to test anything"
    assert latest_checkpoint(ckpts).name == f"step-{k1}"
    rows1 = rows_of(root)
    assert [r["step"] for r in rows1] == list(range(1, k1 + 1))

    # 2. SIGKILL of rank 1 after at least one more checkpoint: the launcher names it and fails.
    p = launch(cfg)
    killed_at = wait_for_step(root / "sft", k1 + 4, p)
    os.kill(rank_pid(p.pid, 1), signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    assert p.returncode not in (0, 75), err[-3000:]
    assert "rank 1" in err and "SIGKILL" in err, err[-3000:]
    rows2 = rows_of(root)
    assert_resumed_at(rows1, rows2, k1)
    s = int(latest_checkpoint(ckpts).name.split("-")[1])
    assert k1 < s <= killed_at + 1

    # 3. Rank 0 killed between files of its next save: a .tmp folder, never a complete checkpoint.
    r = run_cli("sft", cfg, env=cli_env(STACKLLAMA_FAULT="ckpt_between_files"))
    assert r.returncode not in (0, 75) and "rank 0" in r.stderr, r.stderr[-3000:]
    rows3 = rows_of(root)
    assert_resumed_at(rows2, rows3, s)  # the last complete checkpoint
    m = (s // 3 + 1) * 3
    assert (ckpts / f".tmp-step-{m}").is_dir() and m < N_STEPS
    assert latest_checkpoint(ckpts).name == f"step-{s}"

    # 4. The final run resumes from step s (not the half-written m), cleans up and finishes. It
    # saves only at the end, so step-m is never rewritten: its absence shows the cleanup.
    r = run_cli("sft", cfg, "--set", "sft.save_every=1000")
    assert r.returncode == 0, r.stderr[-4000:]
    assert {p.name for p in ckpts.iterdir()} == {f"step-{s}", f"step-{N_STEPS}"}
    rows = rows_of(root)
    assert_resumed_at(rows3, rows, s)
    assert [r["step"] for r in rows] == list(range(1, N_STEPS + 1)), "every step exactly once"
    assert_losses_match(rows, ref, range(1, N_STEPS + 1))
    assert (root / "sft" / "DONE").exists() and (root / "sft" / "model" / "config.json").exists()


def _base_shapes(prepared_root: Path) -> dict[str, tuple]:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(prepared_root / "tiny")
    return {k: tuple(v.shape) for k, v in base.state_dict().items()}


@pytest.mark.slow
def test_zero3_export_is_full_and_cli_export_matches(reference, prepared_root, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stackllama_ds.engines.consolidate import consolidated_state_dict

    shapes = _base_shapes(prepared_root)
    model = AutoModelForCausalLM.from_pretrained(reference / "sft" / "model")
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    final = reference / "sft" / "checkpoints" / f"step-{N_STEPS}"
    trained = consolidated_state_dict(final / "model")
    for k, v in sd.items():
        if k in trained:
            torch.testing.assert_close(v.float(), trained[k], rtol=0, atol=0)  # fp32 run -> fp32 export

    # stackllama-ds export CHECKPOINT --out DIR on an earlier (ZeRO-3, 2-rank) checkpoint.
    older = complete_checkpoints(reference / "sft" / "checkpoints")[0]
    r = run_cli("export", older, "--out", tmp_path / "exp")
    assert r.returncode == 0, r.stderr[-3000:]
    exp = AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    assert {k: tuple(v.shape) for k, v in exp.state_dict().items()} == shapes
    want = consolidated_state_dict(older / "model")
    assert all(torch.equal(v.float(), want[k]) for k, v in exp.state_dict().items() if k in want)
    assert not torch.equal(exp.state_dict()["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "exp")
    ids = tok("Question: which hops?\n\nAnswer:", return_tensors="pt").input_ids
    gen = exp.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, ids.shape[1] + 6)


@pytest.mark.slow
def test_cli_export_refuses_altered_checkpoint(reference, tmp_path):
    import shutil

    src = latest_checkpoint(reference / "sft" / "checkpoints")
    ckpt = tmp_path / src.name
    shutil.copytree(src, ckpt)
    victim = sorted((ckpt / "model" / "ds").glob("*optim_states.pt"))[-1]
    with open(victim, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    r = run_cli("export", ckpt, "--out", tmp_path / "exp")
    assert r.returncode == 2 and "checksum mismatch in model/ds/" + victim.name in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "exp").exists()
