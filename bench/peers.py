"""Peer environments for the benchmarks: TRL in its own virtual environments under bench/peers/.

    python bench/peers.py              # set up every peer (idempotent; cached)
    python bench/peers.py trl116       # just one

torch is installed FIRST (the CPU wheel on disk) and pinned with a constraints file, otherwise pip
resolves a CUDA torch and its multi-GB stack. Each environment is marked ready by a stamp file
holding its spec, so a changed spec rebuilds it and an interrupted install is retried.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
TORCH = "torch==2.13.0"

# name -> (packages, import check). trl 1.16: SFTTrainer/RewardTrainer on our transformers;
# trl 0.11.4: the classic PPOTrainer of the StackLLaMA run, which needs transformers 4.x.
SPECS: dict[str, tuple[list[str], str]] = {
    "trl116": (
        ["trl==1.16.0", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0", "peft==0.21.2",
         "tokenizers==0.23.3", "psutil"],
        "import trl, transformers; from trl import SFTTrainer, RewardTrainer",
    ),
    "trl011": (
        ["trl==0.11.4", "transformers==4.46.3", "accelerate==1.1.1", "datasets==3.1.0", "peft==0.13.2",
         "tokenizers==0.20.3", "numpy<2.3", "psutil", "rich"],
        "import trl, transformers; from trl import PPOTrainer, PPOConfig, AutoModelForCausalLMWithValueHead",
    ),
}


def python(name: str) -> Path:
    return PEERS / f"venv-{name}" / "bin" / "python"


def ensure(name: str, log=print) -> tuple[Path | None, str]:
    """(python of the peer's venv, "") when ready; (None, why) when it could not be set up."""
    pkgs, check = SPECS[name]
    venv = PEERS / f"venv-{name}"
    stamp = venv / "READY"
    spec = "\n".join([TORCH, *pkgs])
    if stamp.exists() and stamp.read_text() == spec:
        return python(name), ""
    PEERS.mkdir(parents=True, exist_ok=True)
    log(f"[peers] setting up {venv} ({', '.join(pkgs[:2])}) - once, a few minutes")
    cons = PEERS / "constraints.txt"
    cons.write_text(TORCH + "\n")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python(name)), "-m", "pip", "install", "-q", TORCH],
        [str(python(name)), "-m", "pip", "install", "-q", "-c", str(cons), *pkgs],
        [str(python(name)), "-c", check],
    ]
    for cmd in steps:
        if cmd[1:3] == ["-m", "venv"] and python(name).exists():
            continue
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            return None, f"peer {name}: `{' '.join(cmd[:5])} ...` failed: {' | '.join(tail)}"
    stamp.write_text(spec)
    return python(name), ""


if __name__ == "__main__":
    names = sys.argv[1:] or list(SPECS)
    bad = 0
    for n in names:
        py, why = ensure(n)
        print(f"{n}: {py or why}")
        bad += py is None
    sys.exit(1 if bad else 0)
