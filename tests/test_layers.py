"""Dependencies point one way (engines/ alone imports deepspeed, rl/ only torch, models/ builds without
DeepSpeed, no import cycle anywhere): checked by walking every module's imports, function-level ones
included, with ast."""

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
            # not config_loader: the loader imports the schema, never the other way
            assert {n for n in names if n.startswith("stackllama_ds")} <= {"stackllama_ds.hardware"}, mod
        if mod == "config_loader.py":  # the YAML reader: yaml, pydantic's errors, the schema
            assert top <= {"pydantic", "yaml", "stackllama_ds"}, (mod, top)
            assert {n for n in names if n.startswith("stackllama_ds")} == {"stackllama_ds.config"}, mod


def test_lower_layers_do_not_import_stages():
    for mod, names in _modules().items():
        if mod.split("/")[0] in ("rl", "data", "models", "engines", "run", "evaluation", "config.py",
                                 "config_loader.py"):
            assert not {n for n in names if n.startswith("stackllama_ds.stages")}, mod


# --- The module graph: every import, function-level ones included, as module -> modules it imports.

def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Edges between stackllama_ds modules: ``from stackllama_ds.x import name`` points at ``x.name``
    when that is a module, else at ``x``; relative imports are resolved against the importer."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from .x import y, from . import y
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
        graph[mod] = {t for t in targets if t in files and t != mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None: depth-first search for an edge back onto the path."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[mod] = 2
        return None

    for mod in sorted(graph):
        if mod not in state and (found := visit(mod)):
            return found
    return None


def test_no_import_cycle():
    # An import inside a function that only hides a cycle still counts: the graph holds every import.
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _within(mod: str, *pkgs: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in pkgs)


def test_data_and_models_stay_below_runs_stages_and_entry_points():
    upper = [f"stackllama_ds.{m}" for m in ("run", "stages", "evaluation", "cli", "pipeline")]
    for mod, deps in _graph().items():
        if _within(mod, "stackllama_ds.data", "stackllama_ds.models"):
            bad = {d for d in deps if _within(d, *upper)}
            assert not bad, f"{mod} imports {bad}"


def test_data_and_models_take_paths_not_the_run_config():
    # They get paths and the config sections they need (cfg.rm, cfg.model), never the whole run.
    for path in [*(PKG / "data").rglob("*.py"), *(PKG / "models").rglob("*.py")]:
        used = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        used |= {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
                 for a in n.names}
        assert "RunConfig" not in used, f"{path.relative_to(PKG)} takes the whole RunConfig"


def test_models_build_without_deepspeed():
    # models/ builds and loads plain modules; engines/ wraps them (ZeRO-3 construction: engines/load.py).
    for mod, deps in _graph().items():
        if _within(mod, "stackllama_ds.models"):
            bad = {d for d in deps if _within(d, "stackllama_ds.engines")}
            assert not bad, f"{mod} imports {bad}"
    for mod, names in _modules().items():
        if mod.startswith("models/"):
            bad = {n for n in names if _within(n, "deepspeed")}
            assert not bad, f"{mod} imports {bad}"
