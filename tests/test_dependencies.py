"""Dependency floors admit no combination known to break (pyproject.toml), and the pinned set
(launch/constraints.txt) and this environment satisfy them.

    python -m pytest tests/test_dependencies.py -q
"""

from __future__ import annotations

from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# package -> the lowest version that works, and why
FLOORS = {
    "bitsandbytes": "0.48",  # transformers refuses .to() on an 8-bit model below it; DeepSpeed calls it
    "transformers": "4.56",  # from_pretrained(dtype=...)
    "datasets": "4.0",  # datasets.List
    "sentencepiece": "0.2.3",  # LLaMA folders with only tokenizer.model
    "protobuf": "7.36.1",  # sentencepiece 0.2.3's generated code checks the runtime
}


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def _floor(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(lows) if lows else None


def _pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "launch" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==")
            out[name.strip().lower()] = ver.strip()
    return out


def test_floors_exclude_known_broken_versions_and_admit_the_tested_set():
    reqs, pins = _requirements(), _pins()
    for name, known in FLOORS.items():
        assert name in reqs, f"{name} is not a dependency"
        floor = _floor(reqs[name])
        assert floor is not None and floor >= Version(known), f"{reqs[name]}: needs >= {known}"
    for name, req in reqs.items():
        assert name in pins, f"{name} has no pin in launch/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs pinned {pins[name]}"
        installed = Version(metadata.version(name)).base_version  # 2.13.0+cpu -> 2.13.0
        assert req.specifier.contains(installed, prereleases=True), f"{req} vs installed {installed}"
