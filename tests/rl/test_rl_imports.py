"""`stackllama_ds.rl` is pure math: it imports torch and the standard library only."""

import ast
import subprocess
import sys
from pathlib import Path

import stackllama_ds.rl as rl

RL_DIR = Path(rl.__file__).parent
ALLOWED = {"torch", "__future__", "collections", "dataclasses", "math"}


def test_rl_modules_import_only_torch_and_stdlib():
    for path in RL_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= ALLOWED, f"{path.name}:{node.lineno} imports {roots - ALLOWED}"
            assert not any("distributed" in a.name for a in node.names), f"{path.name}:{node.lineno}"


def test_import_pulls_in_no_heavy_packages():
    code = (
        "import sys, stackllama_ds.rl\n"
        "heavy = {'deepspeed', 'transformers', 'peft', 'pydantic', 'yaml', 'stackllama_ds.config'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=RL_DIR.parents[1],
    )
    assert out.stdout.strip() == "[]"


def test_public_names():
    expected = {
        "logprobs_from_logits", "entropy_from_logits", "masked_sum", "masked_mean", "masked_var",
        "masked_whiten", "masked_moments", "moments_to_mean_var", "kl_penalty", "per_token_rewards",
        "gae", "policy_loss", "value_loss", "AdaptiveKLController", "FixedKLController",
        "RunningMoments", "Rollout", "degenerate_fraction", "is_degenerate",
    }  # fmt: skip
    assert expected <= set(rl.__all__)
    assert all(hasattr(rl, name) for name in rl.__all__)
