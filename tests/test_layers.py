"""Dependencies point one way (engines/ alone imports deepspeed, rl/ only torch): checked by walking
every module's imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "stackllama_ds"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PKG)): _imports(p) for p in PKG.rglob("*.py")}


def test_only_engines_import_deepspeed_or_torch_distributed():
    for mod, names in _modules().items():
        if mod.startswith("engines/") or mod == "launcher/spawn.py":
            continue
        bad = {n for n in names if n.split(".")[0] == "deepspeed" or n.startswith("torch.distributed")}
        # The universal-checkpoint converter is a file-format tool, run lazily inside run/checkpoint.py.
        if mod == "run/checkpoint.py":
            bad -= {"deepspeed.checkpoint.ds_to_universal"}
        assert not bad, f"{mod} imports {bad}: go through stackllama_ds.engines"


# A stage's own parts live beside it; no stage imports another stage.
STAGE_PARTS = {"stages/ppo.py": {"stackllama_ds.stages.ppo_steps"}}


def test_stages_never_import_each_other():
    for mod, names in _modules().items():
        if mod.startswith("stages/"):
            assert not {n for n in names if n.startswith("stackllama_ds.stages")} - STAGE_PARTS.get(mod, set()), mod


def test_rl_needs_only_torch_and_config_only_pydantic_yaml():
    for mod, names in _modules().items():
        top = {n.split(".")[0] for n in names} - {"__future__", "math", "dataclasses", "collections", "typing", "os",
                                                  "pathlib", "re"}
        if mod.startswith("rl/"):
            assert top <= {"torch"}, (mod, top)
        if mod == "config.py":  # plus the hardware probe that resolves dtype: auto (stdlib, lazy torch)
            assert top <= {"pydantic", "stackllama_ds"}, (mod, top)
            # config_loader: only inside the module __getattr__ that keeps the loader's old names importable
            assert {n for n in names if n.startswith("stackllama_ds")} <= {"stackllama_ds.hardware",
                                                                            "stackllama_ds.config_loader"}, mod
        if mod == "config_loader.py":  # the YAML reader: yaml, pydantic's errors, the schema
            assert top <= {"pydantic", "yaml", "stackllama_ds"}, (mod, top)
            assert {n for n in names if n.startswith("stackllama_ds")} == {"stackllama_ds.config"}, mod


def test_lower_layers_do_not_import_stages():
    for mod, names in _modules().items():
        if mod.split("/")[0] in ("rl", "data", "models", "engines", "run", "evaluation", "config.py",
                                 "config_loader.py"):
            assert not {n for n in names if n.startswith("stackllama_ds.stages")}, mod
