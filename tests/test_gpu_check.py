"""bench/gpu_check.sh on a machine without a GPU, and the helpers it takes from bench/gpu.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"
GPU_PY = REPO / "bench" / "gpu.py"


def _fake_nvidia_smi(bindir: Path, rc: int) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\nexit {rc}\n")
    exe.chmod(0o755)


def _run(args: list[str], tmp_path: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("smi_rc, reason", [(9, "nvidia-smi -L failed"), (0, "torch.cuda.is_available() is False")])
def test_skips_quickly_without_a_gpu_and_writes_nothing_heavy(tmp_path, smi_rc, reason):
    # A fake nvidia-smi first on PATH makes the outcome the same on every machine: failing, or
    # answering while torch sees no CUDA device (CUDA_VISIBLE_DEVICES="").
    _fake_nvidia_smi(tmp_path / "bin", smi_rc)
    t = time.time()
    r = _run([], tmp_path, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert r.returncode == 0, r.stderr
    assert "gpu_check: skipped" in r.stdout and reason in r.stdout
    assert time.time() - t < 60
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["summary.md"] and files[0].stat().st_size < 1024


def test_script_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    r = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_every_run_config_validates(tmp_path, model):
    r = _run(["--validate"], tmp_path, GPU_CHECK_MODEL=model)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("OK (world size 1)") == 4  # ppo-lora-8bit, resume, ppo-zero3-gen, ppo-lora-4bit


# The checks of a run in their order, and the figure each line starts with: a number.
CHECKS = ("env", "preflight", "prepare", "ppo-lora-8bit", "export", "resume", "ppo-zero3-gen", "ppo-lora-4bit")
LINE = re.compile(r"^GPU-CHECK (\S+): (.*)$", re.M)


@pytest.mark.slow
def test_dry_run_runs_every_check_on_cpu_and_prints_its_figure(tmp_path):
    """--dry-run: the GPU plan end to end on the tiny model with DS_ACCELERATOR=cpu; only bench is skipped."""
    t = time.time()
    r = _run(["--dry-run"], tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = LINE.findall(r.stdout)
    assert [n for n, _ in lines] == [*CHECKS, "bench"], r.stdout
    figures = dict(lines)
    for name in CHECKS:
        m = re.match(r"(\d+(?:\.\d+)?) ", figures[name])
        assert m, f"{name}: no figure in {figures[name]!r}"
        figures[name] = float(m.group(1))
    assert figures["ppo-lora-8bit"] > 0 and figures["ppo-zero3-gen"] > 0 and figures["ppo-lora-4bit"] > 0  # s/step
    assert figures["resume"] == 2  # resumed after the step-2 checkpoint, not from scratch
    assert figures["export"] > 0
    assert dict(lines)["bench"].startswith("skipped (needs CUDA")
    out = tmp_path / "out"
    assert LINE.findall((out / "figures.txt").read_text()) == lines  # the same lines, kept as printed
    assert "8 passed, 0 failed" in (out / "summary.md").read_text()
    assert not (out / "work").exists()
    print(f"dry run: {time.time() - t:.0f} s")


def test_resume_figure_fails_a_run_that_started_over(tmp_path):
    """The resume check's evidence: rows up to the checkpoint kept as written (wall-clock fields too)."""
    before = [{"step": 1, "elapsed_s": 1.0}, {"step": 2, "elapsed_s": 2.0}]
    new = {"step": 3, "elapsed_s": 3.0, "t_generate": 0.5, "t_score": 0.1, "t_logprobs": 0.1, "t_train": 0.3}
    root = tmp_path / "root"
    (root / "ppo").mkdir(parents=True)
    (tmp_path / "before.jsonl").write_text("".join(json.dumps(x) + "\n" for x in before))

    def fig(after: list[dict]) -> subprocess.CompletedProcess:
        (root / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in after))
        return subprocess.run([sys.executable, str(GPU_PY), "figure", "resume", "--root", str(root), "--before",
                               str(tmp_path / "before.jsonl")], capture_output=True, text=True)

    r = fig([*before, new])
    assert r.returncode == 0 and r.stdout.startswith("2 (resumed after step 2 of 2; 1 new step(s), the last 1.000 s")
    r = fig([{"step": 1, "elapsed_s": 1.5}, {"step": 2, "elapsed_s": 2.5}, new])  # recomputed: started over
    assert r.returncode == 1 and r.stdout.startswith("0 (")


def test_init_model_draws_random_weights_at_a_config(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    src = tmp_path / "src"
    src.mkdir()
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(str(src))
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_text("not copied")
    subprocess.run([sys.executable, str(GPU_PY), "init-model", str(src), str(tmp_path / "out")], check=True,
                   capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.config.hidden_size == 16 and (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert not (tmp_path / "out.tmp").exists()


def test_carried_folder_is_ignored_by_git():
    r = subprocess.run(["git", "check-ignore", "-q", ".gpu_check/wheels/x.whl"], cwd=REPO)
    assert r.returncode == 0  # it travels with `carry`, never in a commit


def test_memhook_records_the_cuda_peak_of_a_stage_process(tmp_path):
    stub = tmp_path / "stub"  # a torch whose CUDA was used: the hook reads only these calls
    stub.mkdir()
    (stub / "torch.py").write_text(
        "class cuda:\n"
        "    is_initialized = staticmethod(lambda: True)\n"
        "    max_memory_allocated = staticmethod(lambda: 3 * 2**30)\n"
        "    max_memory_reserved = staticmethod(lambda: 4 * 2**30)\n")
    (tmp_path / "mem").mkdir()
    prog = tmp_path / "prog.py"
    prog.write_text("import torch\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'bench' / 'turnhook'}{os.pathsep}{stub}", "GPU_CHECK_MEMLOG": str(tmp_path / "mem"),
           "GPU_CHECK_RUN": "z2"}
    for argv in (["sft", "cfg.yaml"], ["pipeline", "cfg.yaml"]):  # only stage processes record
        subprocess.run([sys.executable, str(prog), *argv], env=env, check=True)
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "mem").iterdir()]
    assert (rec["run"], rec["stage"], rec["max_allocated"], rec["max_reserved"]) == ("z2", "sft", 3 * 2**30, 4 * 2**30)


def test_report_puts_measured_peaks_beside_the_plan(tmp_path):
    out, gib = tmp_path / "out", 2**30
    (out / "mem").mkdir(parents=True)
    (out / "steps.tsv").write_text("preflight\tpass\t0\t12\t90\t0\t\nz2-pipeline\tfail\t1\t80\t300\t40\texit 1: boom\n")
    (out / "mem" / "sft-1.json").write_text(json.dumps(
        {"run": "z2", "stage": "sft", "max_allocated": 2 * gib, "max_reserved": 3 * gib}))
    (out / "plan-z2.json").write_text(json.dumps({"run": "z2", "stages": {"sft": {"live_gb": 2.5, "total_gb": 4.25}}}))
    run = out / "work" / "z2"
    (run / "sft").mkdir(parents=True)
    (run / "data").mkdir()
    (run / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n')
    subprocess.run([sys.executable, str(GPU_PY), "report", str(out), "--model", "tiny"], check=True,
                   capture_output=True)
    md = (out / "summary.md").read_text()
    assert "1 passed, 1 failed" in md and "exit 1: boom" in md
    assert "+25%" in md  # plan live 2.5 GiB vs 2 GiB allocated
    summary = json.loads((out / "summary.json").read_text())
    assert summary["memory"][0]["plan_total_gb"] == 4.25
    assert summary["figures"][0] == {"run": "z2", "stage": "sft", "done": False, "steps": 2, "loss": 2.5,
                                     "eval_loss": None, "tokens_per_s": None}


def test_slim_wheel_keeps_the_named_native_libraries(tmp_path):
    whl = tmp_path / "bitsandbytes-0-py3-none-any.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda118.so",
             "bitsandbytes/libbitsandbytes_cuda130.so"]
    with zipfile.ZipFile(whl, "w") as z:
        for n in names:
            z.writestr(n, "x")
        z.writestr("bitsandbytes-0.dist-info/RECORD", "".join(f"{n},,1\n" for n in names))
    subprocess.run([sys.executable, str(GPU_PY), "slim-wheel", str(whl), "--keep", "cpu,cuda13"], check=True,
                   capture_output=True)
    with zipfile.ZipFile(whl) as z:
        kept = [n for n in z.namelist() if not n.endswith("RECORD")]
        record = z.read("bitsandbytes-0.dist-info/RECORD").decode()
    assert kept == [names[0], names[1], names[3]] and "cuda118" not in record
