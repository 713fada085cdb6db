"""Property tests of config loading: malformed YAML and configs always give one line per error,
``FILE:LINE: dotted.field: message``, never a traceback; and the CLI starts no process for them.

    python -m pytest tests/test_config_fuzz.py -q

Generated: unknown keys at random depths, wrong types and out-of-range numbers for random known
fields (1-3 mutations at once: exactly that many lines, each naming its field and the YAML line of
it), corrupted YAML text and arbitrary bytes (a ConfigError or a valid config, nothing else).
Hand-written messages for each kind of error are in tests/test_config.py.
"""

from __future__ import annotations

import copy
import string
import time
import types
import typing
from pathlib import Path

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from stackllama_ds.config import RunConfig
from stackllama_ds.config_loader import ConfigError, load_config
from tests.conftest import BEER, TINY_YAML, run_cli

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BASE = yaml.safe_load(TINY_YAML.read_text())
BASE["data"]["posts"] = str(BEER)


# ------------------------------------------------------------------- the schema, walked once
_UNIONS = (typing.Union, types.UnionType)


def _submodel(ann) -> type[BaseModel] | None:
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _walk(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    for name, f in model.model_fields.items():
        if f.exclude:  # config_path: set by load_config, not by YAML
            continue
        sub = _submodel(f.annotation)
        if sub is not None:
            yield "model", prefix + (name,), sub
            yield from _walk(sub, prefix + (name,))
        elif typing.get_origin(f.annotation) in _UNIONS and any(_submodel(a) for a in typing.get_args(f.annotation)):
            continue  # rule_reward: Model | None
        else:
            yield "leaf", prefix + (name,), f


NODES = list(_walk(RunConfig))
MODELS = [(path, m) for kind, path, m in NODES if kind == "model"] + [((), RunConfig)]
LEAVES = [(path, f) for kind, path, f in NODES if kind == "leaf"]


def _wrong_value(ann):
    """A value of the wrong type for a field (not one pydantic's lax mode would coerce)."""
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    base = args[0] if typing.get_origin(ann) in _UNIONS and len(args) == 1 else ann  # X | None -> X
    if typing.get_origin(base) is typing.Literal:
        return "zz-not-a-choice"
    if base in (int, float):
        return "twelve"
    if base is bool:
        return "maybe"
    if base is str:
        return {"a": 1}
    if typing.get_origin(base) in (list, tuple):
        return "x"
    return {"nested": {"not": "expected"}}


def _out_of_range(f, k: int):
    """A number violating one of the field's bounds by k (k >= 1), or None when it has none."""
    is_int = f.annotation is int or int in typing.get_args(f.annotation)
    for m in f.metadata:
        if isinstance(m, at.Ge):
            return m.ge - k if is_int else m.ge - k / 7
        if isinstance(m, at.Gt):
            return m.gt - (k - 1) if is_int else m.gt - (k - 1) / 7
        if isinstance(m, at.Le):
            return m.le + k if is_int else m.le + k / 7
        if isinstance(m, at.Lt):
            return m.lt + (k - 1)
    return None


RANGED = [(path, f) for path, f in LEAVES if _out_of_range(f, 1) is not None]
KEY = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=10) | st.sampled_from(
    ["zero_stag", "lr ", "seq_lenght", "ppo_epoch", "bätch", "max steps"]
)


@st.composite
def mutation(draw):
    """(kind, path, value) for one error: unknown key, wrong type or out-of-range number."""
    kind = draw(st.sampled_from(["unknown", "type", "range"]))
    if kind == "unknown":
        path, model = draw(st.sampled_from(MODELS))
        key = draw(KEY.filter(lambda k: k not in model.model_fields))
        return kind, path + (key,), draw(st.integers() | st.text(max_size=5) | st.booleans())
    if kind == "type":
        path, f = draw(st.sampled_from(LEAVES))
        return kind, path, _wrong_value(f.annotation)
    path, f = draw(st.sampled_from(RANGED))
    return kind, path, _out_of_range(f, draw(st.integers(1, 10**6)))


def _put(d: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _independent(muts) -> bool:
    paths = [m[1] for m in muts]
    return all(a == b or (a[: len(b)] != b and b[: len(a)] != a) for a in paths for b in paths) and len(
        set(paths)
    ) == len(paths)


def _check_lines(lines: list[str], path: Path) -> None:
    for line in lines:
        assert "\n" not in line and "Traceback" not in line, line
        assert line.startswith(f"{path}:"), line


# ------------------------------------------------------------------------------ properties
@FUZZ
@given(muts=st.lists(mutation(), min_size=1, max_size=3).filter(_independent))
def test_each_error_is_one_line_naming_file_line_and_field(tmp_path_factory, muts):
    cfg = copy.deepcopy(BASE)
    for _, p, v in muts:
        _put(cfg, p, v)
    f = tmp_path_factory.mktemp("fuzz") / "bad.yaml"
    f.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    text_lines = f.read_text().splitlines()
    with pytest.raises(ConfigError) as ei:
        load_config(f, world_size=2, check_files=False)
    lines = ei.value.lines
    _check_lines(lines, f)
    assert len(lines) == len(muts), (muts, lines)
    for kind, p, _ in muts:
        dotted = ".".join(p)
        hit = [ln for ln in lines if f": {dotted}: " in ln]
        assert len(hit) == 1, (dotted, lines)
        lineno = int(hit[0][len(str(f)) + 1 :].split(":", 1)[0])
        assert p[-1] in text_lines[lineno - 1], (lineno, text_lines[lineno - 1], dotted)
        if kind == "unknown":
            assert "unknown key" in hit[0], hit[0]  # a removed key adds why in parentheses


BREAKERS = ["  - [unclosed", "key: 'unterminated", "\tsft: 1", "sft: : :", "{", "foo: bar: baz", "]", "- a\nb: c",
            "  &anchor", "*undefined_alias", "? complex", "%YAML 9.9", "---\nsecond: doc", "x: !!binary AAA="]


@FUZZ
@given(where=st.integers(0, 200), breaker=st.sampled_from(BREAKERS) | st.text(max_size=12))
def test_corrupted_yaml_is_a_config_error_or_valid(tmp_path_factory, where, breaker):
    lines = TINY_YAML.read_text().splitlines()
    i = where % (len(lines) + 1)
    f = tmp_path_factory.mktemp("fuzz") / "broken.yaml"
    f.write_text("\n".join(lines[:i] + [breaker] + lines[i:]) + "\n")
    try:
        load_config(f, world_size=2, check_files=False)
    except ConfigError as e:
        _check_lines(e.lines, f)
        for ln in e.lines:
            if "invalid YAML" in ln:
                n = ln[len(str(f)) + 1 :].split(":", 1)[0]
                assert not n.isdigit() or 1 <= int(n) <= len(lines) + 3, ln


@FUZZ
@given(blob=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_never_a_traceback(tmp_path_factory, blob):
    f = tmp_path_factory.mktemp("fuzz") / "junk.yaml"
    f.write_bytes(blob)
    try:
        load_config(f, world_size=2, check_files=False)
    except ConfigError as e:
        _check_lines(e.lines, f)


@FUZZ
@given(key=st.lists(KEY, min_size=1, max_size=4).map(".".join), value=st.text(max_size=10))
def test_overrides_name_the_set_flag(tmp_path_factory, key, value):
    f = tmp_path_factory.mktemp("fuzz") / "ok.yaml"
    f.write_text(yaml.safe_dump(BASE))
    try:
        load_config(f, [f"{key}={value}"], world_size=2, check_files=False)
    except ConfigError as e:
        for ln in e.lines:
            assert "\n" not in ln and (ln.startswith("--set ") or ln.startswith(f"{f}:")), ln


@pytest.mark.parametrize("text", ["a: &x [*x]\n", "sft: " + "[" * 2000 + "]" * 2000 + "\n", "seed: \xff\n"])
def test_pathological_yaml(tmp_path, text):
    f = tmp_path / "p.yaml"
    f.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    with pytest.raises(ConfigError) as ei:
        load_config(f, check_files=False)
    _check_lines(ei.value.lines, f)


def test_duplicate_key_is_an_error(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("sft:\n  engine:\n    zero_stage: 2\n    dtype: fp32\n    zero_stage: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f, check_files=False)
    assert ei.value.lines == [f"{f}:5: sft.engine.zero_stage: duplicate key (first at line 3)"]


# ------------------------------------------------------------- the CLI: exit 2, nothing started
CLI_CASES = {  # case -> (mutation of the valid config, text appended, fragment of the message)
    "unknown_key": (("sft", "engine", "zero_stag"), 3, "", "sft.engine.zero_stag: unknown key"),
    "wrong_type": (("sft", "max_steps"), "lots", "", "sft.max_steps: Input should be a valid integer"),
    "out_of_range": (("launch", "nproc_per_node"), 0, "", "launch.nproc_per_node: Input should be greater"),
    "broken_yaml": (("seed",), 0, "extra: [1, 2\n", "invalid YAML"),
    "duplicate_key": (("seed",), 0, "seed: 1\n", "seed: duplicate key"),
}


@pytest.mark.parametrize("command", ["validate", "sft"])
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_exit_2_fast_and_no_rank_started(tmp_path, command, case):
    path, value, extra, fragment = CLI_CASES[case]
    cfg = dict(copy.deepcopy(BASE), output_root=str(tmp_path / "root"))
    _put(cfg, path, value)
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg, sort_keys=False) + extra)
    t0 = time.time()
    r = run_cli(command, f, timeout=60)
    wall = time.time() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.strip(), r.stderr
    assert all(ln.startswith(f"{f}:") for ln in r.stderr.strip().splitlines()), r.stderr
    assert fragment in r.stderr, r.stderr
    assert not (tmp_path / "root").exists(), "a rank started (the run root was created)"
    assert wall < 10, f"{command} took {wall:.1f} s to refuse a bad config"
