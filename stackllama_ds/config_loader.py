"""Read a run config: YAML file -> ``--set`` overrides -> the schema of config.py -> cross-field checks.

    stackllama-ds validate configs/tiny.yaml --world-size 2 --set ppo.steps=4

Every problem comes back as one line ``FILE:LINE: dotted.field: what is wrong`` (``--set key`` for an
override), with the line taken from the composed YAML, so a config fails before any rank starts.
Imports only yaml, pydantic and the schema.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stackllama_ds.config import REMOVED, RunConfig, cross_checks


class ConfigError(Exception):
    """A config that does not validate; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _yaml_lines(node: yaml.Node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map every dotted key path of a composed YAML document to its 1-based line."""
    out: dict[tuple[str, ...], int] = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (str(k.value),)
            out[key] = k.start_mark.line + 1
            for sub, line in _yaml_lines(v, key).items():
                if sub != key:
                    out[sub] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_yaml_lines(v, prefix + (str(i),)))
    return out


def _duplicate_keys(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], int, int]]:
    """Keys given twice in one mapping (YAML keeps the last silently): (dotted key, line, first line)."""
    out: list[tuple[tuple[str, ...], int, int]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            name, line = str(k.value), k.start_mark.line + 1
            if isinstance(k, yaml.ScalarNode) and name != "<<":
                if name in seen:
                    out.append((prefix + (name,), line, seen[name]))
                seen.setdefault(name, line)
            out += _duplicate_keys(v, prefix + (name,))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicate_keys(v, prefix + (str(i),))
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError([f"--set {item}: expected dotted.key=value"])
        k, v = item.split("=", 1)
        try:
            val = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            val = v
        out.append((k.strip(), val))
    return out


def _union_branch(raw: object, loc: tuple[str, ...]) -> bool:
    """pydantic names the member of a union a value failed (``data.posts.list[str]``): the last
    element of ``loc`` is then not a key of the raw input at ``loc[:-1]``."""
    node = raw
    for k in loc[:-1]:
        if isinstance(node, dict) and k in node:
            node = node[k]
        elif isinstance(node, list) and k.isdigit() and int(k) < len(node):
            node = node[int(k)]
        else:
            return False
    if isinstance(node, dict):
        return loc[-1] not in node
    if isinstance(node, list):
        return not loc[-1].isdigit()
    return True  # a scalar has no keys: the tag of a union member


def _read_yaml(p: Path, src: str) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """The config file's top-level mapping and the YAML line of every key path.

    Raises ConfigError (``src:LINE: ...``) for a missing file, bytes that are not UTF-8, invalid YAML,
    a top level that is not a mapping, and duplicate keys."""
    if not p.exists():
        raise ConfigError([f"{src}: config file not found"])
    blob = p.read_bytes()
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{src}:{line}: not UTF-8 text "
                           f"(byte {blob[e.start]:#04x} at offset {e.start})"]) from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
        lines = _yaml_lines(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{src}:{mark.line + 1}" if mark is not None else src
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{src}: invalid YAML: nested too deeply"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{src}:1: top level must be a mapping of sections, got {type(data).__name__}"])
    dups = _duplicate_keys(node)
    if dups:
        raise ConfigError([f"{src}:{line}: {'.'.join(key)}: duplicate key (first at line {first})"
                           for key, line, first in dups])
    return data, lines


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | None = None,
    world_size: int | None = None,
    check_files: bool = True,
) -> RunConfig:
    """Read, override and validate a config; raise ConfigError with one line per problem.

    Each line reads ``FILE:LINE: dotted.path: message`` (``--set key`` for an override).
    ``world_size`` defaults to launch.nnodes x launch.nproc_per_node.
    """
    src = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        raw, lines = _read_yaml(Path(path), src)
    set_keys: dict[tuple[str, ...], str] = {}
    for k, v in parse_overrides(overrides):
        _set_dotted(raw, k, v)
        set_keys[tuple(k.split("."))] = k

    def where(loc: tuple[str, ...]) -> str:
        for n in range(len(loc), 0, -1):
            if loc[:n] in set_keys:
                return f"--set {set_keys[loc[:n]]}"
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                return f"{src}:{lines[loc[:n]]}"
        return src

    try:
        cfg = RunConfig.model_validate(raw)
    except RecursionError:  # a recursive YAML alias (a: &x [*x])
        raise ConfigError([f"{src}: invalid YAML: a value refers to itself (recursive alias)"]) from None
    except ValidationError as e:
        msgs: dict[tuple[str, ...], list[str]] = {}  # one line per field, in order
        for err in e.errors():
            loc = tuple(str(x) for x in err["loc"])
            if len(loc) > 1 and err["type"] != "missing" and _union_branch(raw, loc):
                loc = loc[:-1]  # a union (str | list[str]) reports each member: one field, one line
            dotted = ".".join(loc) or "<root>"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown key ({REMOVED[dotted]})" if dotted in REMOVED else "unknown key"
            elif err["type"] == "missing":
                msg = "required field missing"
            elif "input" in err and err["type"] not in ("model_type",) and not isinstance(err["input"], dict):
                msg = f"{msg} (got {err['input']!r})"
            msgs.setdefault(loc, []).append(msg.removeprefix("Value error, "))
        raise ConfigError([f"{where(loc)}: {'.'.join(loc) or '<root>'}: {' | '.join(dict.fromkeys(m))}"
                           for loc, m in msgs.items()]) from None
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    cfg.config_path = str(Path(path).resolve()) if path is not None else None
    ws = world_size if world_size is not None else cfg.world_size
    errs = cross_checks(cfg, ws, base)
    if not check_files:
        errs = [e for e in errs if "not found" not in e[1] and "model folder" not in e[1]]
    if errs:
        raise ConfigError([f"{where(loc)}: {'.'.join(loc)}: {m}" for loc, m in errs])
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
