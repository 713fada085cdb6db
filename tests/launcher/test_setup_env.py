"""launch/setup_env.sh's reuse decision and torch pin, and launch/gpu_torch_check.sh (issue 24, item 1).

setup_env.sh runs in a copy of the repository whose .venv holds a fake python (it reports the torch
build written in .venv/torch) and a fake pip (it logs its arguments and "installs" the torch pin it
is given): the decision, the pip lines and the marker are real, nothing is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

TORCH = "2.13.0"
GPU_LINE = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f2c1e0a-0000-0000-0000-000000000000)"


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _fake_bin(tmp: Path, gpus: bool) -> Path:
    """A PATH folder whose nvidia-smi lists one H100, or fails as on a host without a driver."""
    d = tmp / ("bin-gpu" if gpus else "bin-cpu")
    if gpus:
        _exe(d / "nvidia-smi", f'#!/bin/sh\necho "{GPU_LINE}"\n')
    else:
        _exe(d / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    return d


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """pyproject.toml + launch/ copied, with a fake .venv holding torch 2.13.0+cpu."""
    r = tmp_path / "repo"
    (r / "launch").mkdir(parents=True)
    for f in ("launch/setup_env.sh", "launch/constraints.txt", "pyproject.toml"):
        shutil.copy2(REPO / f, r / f)
    venv = r / ".venv"
    _exe(venv / "bin" / "python", f"#!/bin/sh\ncat {venv}/torch\n")
    # Any torch==V+BUILD pin is installed as that build; a bare torch==V keeps what is there (pip:
    # "already satisfied"), else the CPU wheel. FAKE_PIP_NOOP=1: pip changes nothing.
    _exe(
        venv / "bin" / "pip",
        f"""#!/bin/bash
echo "$*" >>{venv}/pip.log
[ "${{FAKE_PIP_NOOP:-0}}" = 1 ] && exit 0
for a in "$@"; do
  case "$a" in
    torch==*+*) v=${{a#torch==}}; echo "$v ${{v#*+}}" >{venv}/torch ;;
    torch==*) [ -f {venv}/torch ] || echo "${{a#torch==}}+cpu cpu" >{venv}/torch ;;
  esac
done
""",
    )
    (venv / "torch").write_text(f"{TORCH}+cpu cpu\n")
    return r


def _hash(r: Path) -> str:
    return hashlib.sha256(
        (r / "pyproject.toml").read_bytes() + (r / "launch/constraints.txt").read_bytes()
    ).hexdigest()[:16]


def _marker(r: Path, build: str | None, h: str | None = None) -> None:
    """The install marker; build None: the format from before builds were recorded (hash only)."""
    h = h or _hash(r)
    line = h if build is None else f"{h} torch={TORCH}+{build} build={build}"
    (r / ".venv/.stackllama-ds-installed").write_text(line + "\n")


def _run(r: Path, *args: str, cuda: str | None = None, gpus: bool = False, **env: str):
    e = {k: v for k, v in os.environ.items() if k != "STACKLLAMA_TORCH_CUDA"}
    e["PATH"] = os.pathsep.join([str(_fake_bin(r.parent, gpus)), e["PATH"]])
    if cuda is not None:
        e["STACKLLAMA_TORCH_CUDA"] = cuda
    e.update(env)
    return subprocess.run(
        ["bash", str(r / "launch/setup_env.sh"), *args], env=e, capture_output=True, text=True, timeout=60
    )


def _pip_lines(r: Path) -> list[str]:
    p = r / ".venv/pip.log"
    return p.read_text().splitlines() if p.exists() else []


def test_check_refuses_a_cpu_venv_when_cu126_is_asked(repo):
    _marker(repo, "cpu")
    before = (repo / ".venv/.stackllama-ds-installed").read_text()
    r = _run(repo, "--check", cuda="cu126")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith(f"install torch {TORCH}+cu126:"), r.stdout
    # --check decides only: nothing installed, the marker untouched
    assert _pip_lines(repo) == []
    assert (repo / ".venv/.stackllama-ds-installed").read_text() == before


@pytest.mark.parametrize(
    "have, cuda, gpus, rc",
    [
        ("cpu", None, False, 0),  # CPU host, CPU venv
        ("cpu", None, True, 1),  # GPU host, CPU venv: the case, never reused
        ("cu126", None, False, 0),  # a login node keeps a GPU venv as it is
        ("cu124", None, True, 0),  # unset: any CUDA build serves a GPU host
        ("cu126", "cu126", True, 0),
        ("cu126", "cu124", True, 1),  # asked for another CUDA build
        ("cu126", "cpu", False, 1),
    ],
)
def test_check_reuses_only_the_build_asked(repo, have, cuda, gpus, rc):
    _marker(repo, have)
    (repo / ".venv/torch").write_text(f"{TORCH}+{have} {have}\n")
    r = _run(repo, "--check", cuda=cuda, gpus=gpus)
    assert r.returncode == rc, r.stdout + r.stderr


def test_install_switches_the_build_and_records_it(repo):
    _marker(repo, "cpu")
    r = _run(repo, cuda="cu126")
    assert r.returncode == 0, r.stderr
    pip = _pip_lines(repo)
    assert pip[0] == f"install -q --index-url https://download.pytorch.org/whl/cu126 torch=={TORCH}+cu126"
    assert pip[1] == "install -q -c launch/constraints.txt -e .[dev]"
    marker = (repo / ".venv/.stackllama-ds-installed").read_text().split()
    assert marker == [_hash(repo), f"torch={TORCH}+cu126", "build=cu126"]
    assert _run(repo, "--check", cuda="cu126").returncode == 0
    assert _run(repo, "--check", gpus=True).returncode == 0


def test_cpu_host_installs_the_pinned_torch_from_the_default_index(repo):
    (repo / ".venv/torch").unlink()
    r = _run(repo)  # no marker: a fresh venv
    assert r.returncode == 0, r.stderr
    assert _pip_lines(repo)[0] == f"install -q torch=={TORCH}"
    assert (repo / ".venv/.stackllama-ds-installed").read_text().split()[1:] == [
        f"torch={TORCH}+cpu",
        "build=cpu",
    ]


def test_gpu_host_defaults_to_cu126(repo):
    _marker(repo, "cpu")
    r = _run(repo, gpus=True)
    assert r.returncode == 0, r.stderr
    assert _pip_lines(repo)[0].endswith(
        f"--index-url https://download.pytorch.org/whl/cu126 torch=={TORCH}+cu126"
    )


def test_changed_constraints_reinstall_keeping_the_cuda_build(repo):
    _marker(repo, "cu124", h="0" * 16)
    (repo / ".venv/torch").write_text(f"{TORCH}+cu124 cu124\n")
    r = _run(repo)  # CPU login node, nothing asked: the venv stays cu124
    assert r.returncode == 0, r.stderr
    assert f"whl/cu124 torch=={TORCH}+cu124" in _pip_lines(repo)[0]
    assert (repo / ".venv/.stackllama-ds-installed").read_text().split()[0] == _hash(repo)


def test_install_fails_when_the_build_did_not_change(repo):
    _marker(repo, "cpu")
    before = (repo / ".venv/.stackllama-ds-installed").read_text()
    r = _run(repo, cuda="cu126", FAKE_PIP_NOOP="1")
    assert r.returncode == 1
    assert "cu126" in r.stderr and f"{TORCH}+cpu" in r.stderr, r.stderr
    assert (repo / ".venv/.stackllama-ds-installed").read_text() == before


def test_marker_without_build_is_completed_from_the_venv_without_installing(repo):
    _marker(repo, None)
    r = _run(repo)
    assert r.returncode == 0, r.stderr
    assert _pip_lines(repo) == []
    assert (repo / ".venv/.stackllama-ds-installed").read_text().split() == [
        _hash(repo),
        f"torch={TORCH}+cpu",
        "build=cpu",
    ]
    assert _run(repo, "--check", cuda="cu126").returncode == 1


def test_bad_build_name_is_refused(repo):
    _marker(repo, "cpu")
    r = _run(repo, "--check", cuda="cuda12")
    assert r.returncode == 2
    assert _pip_lines(repo) == []


# ------------------------------------------------------------------- launch/gpu_torch_check.sh
def _check(
    tmp: Path, nvidia_smi: str | None, script: str = "launch/gpu_torch_check.sh", *args: str, **env: str
):
    e = {**os.environ, "PYTHON": sys.executable, **env}
    if nvidia_smi is not None:
        e["PATH"] = os.pathsep.join([str(_exe(tmp / "bin" / "nvidia-smi", nvidia_smi).parent), e["PATH"]])
    t = time.monotonic()
    r = subprocess.run(
        ["bash", str(REPO / script), *args], env=e, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    return r, time.monotonic() - t


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_gpu_check_fails_fast_in_one_line_when_torch_cannot_use_the_gpus(tmp_path):
    r, took = _check(tmp_path, f'#!/bin/sh\necho "{GPU_LINE}"\necho "GPU 1: NVIDIA H100 80GB HBM3"\n')
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and r.stdout == "", r.stderr
    assert "2 GPU(s)" in lines[0] and torch.__version__ in lines[0] and "STACKLLAMA_TORCH_CUDA=" in lines[0]
    assert took < 60


@pytest.mark.parametrize(
    "nvidia_smi",
    [
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\nexit 9\n",
        "#!/bin/sh\nexit 0\n",  # lists no GPU
    ],
)
def test_gpu_check_passes_where_no_gpu_is_listed(tmp_path, nvidia_smi):
    r, _ = _check(tmp_path, nvidia_smi)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_gpu_check_names_a_python_without_torch(tmp_path):
    r, _ = _check(tmp_path, f'#!/bin/sh\necho "{GPU_LINE}"\n', PYTHON=str(tmp_path / "no-such-python"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_slurm_stage_stops_before_any_rank_starts(tmp_path):
    """The batch shell runs the check after validating the config, before `multinode job`."""
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "GPUS_PER_NODE": "1"}
    r, _ = _check(
        tmp_path,
        f'#!/bin/sh\necho "{GPU_LINE}"\n',
        "launch/slurm_stage.sh",
        "sft",
        "configs/tiny.yaml",
        **env,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("[launch] nvidia-smi lists 1 GPU(s)"), r.stderr
    assert "step: srun" not in r.stdout + r.stderr  # the batch process never started
