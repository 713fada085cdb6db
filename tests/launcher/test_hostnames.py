"""``slurm.hostnames``: Slurm's own parser (``scontrol show hostnames``) where it exists, our
``expand_hostlist`` only where it does not; both give the same hosts for the forms Slurm emits."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from stackllama_ds.launcher import slurm
from stackllama_ds.launcher.slurm import SlurmEnvError

# Forms SLURM_JOB_NODELIST takes: zero padding, ranges crossing a digit count, several groups,
# products of bracket groups, plain names.
NODELISTS = ["gpu[01-03]", "a1,b[2-4,7]", "n[1-2]", "node-[001-003,010]", "x", "n[8-11]", "gpu[09-10]",
             "r[1-2]n[1-2]", "a,b,c[1,3]", "n[1-3,5],m[07-09]", "n[998-1001]"]
SCONTROL = shutil.which("scontrol")


def _slurm_hosts(nodelist: str) -> list[str]:
    r = subprocess.run([SCONTROL, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def _fake_scontrol(folder: Path, script: str) -> Path:
    """An ``scontrol`` executable in ``folder`` running ``script`` (sh), for PATH lookups."""
    p = folder / "scontrol"
    p.write_text("#!/bin/sh\n" + script + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


@pytest.mark.skipif(SCONTROL is None, reason="scontrol is not on PATH (no Slurm client on this machine)")
@pytest.mark.parametrize("nodelist", NODELISTS)
def test_scontrol_and_the_parser_give_the_same_hosts(nodelist):
    want = _slurm_hosts(nodelist)
    assert slurm.hostnames(nodelist) == want
    assert slurm.expand_hostlist(nodelist) == want


@pytest.mark.skipif(SCONTROL is None, reason="scontrol is not on PATH (no Slurm client on this machine)")
def test_real_scontrol_is_used_where_present(monkeypatch):
    def parser_must_not_run(nodelist: str) -> list[str]:
        raise AssertionError("expand_hostlist used although scontrol is present")

    monkeypatch.setattr(slurm, "expand_hostlist", parser_must_not_run)
    assert slurm.hostnames("n[1-2]") == ["n1", "n2"]


def test_the_parser_runs_only_where_scontrol_is_absent(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(slurm, "expand_hostlist", lambda nodelist: calls.append(nodelist) or ["parsed"])
    # scontrol present: its answer wins, the parser is not asked
    _fake_scontrol(tmp_path, 'echo "from-scontrol-1"; echo "from-scontrol-2"')
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.hostnames("n[1-2]") == ["from-scontrol-1", "from-scontrol-2"]
    assert calls == []
    # scontrol absent: the parser
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert slurm.hostnames("n[1-2]") == ["parsed"]
    assert calls == ["n[1-2]"]


@pytest.mark.parametrize("script", ['echo "Invalid hostlist: $3" >&2; exit 1', "exit 0"])
def test_a_failing_scontrol_is_an_error_not_a_fallback(tmp_path, monkeypatch, script):
    monkeypatch.setattr(slurm, "expand_hostlist", lambda nodelist: pytest.fail("fell back to the parser"))
    _fake_scontrol(tmp_path, script)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    with pytest.raises(SlurmEnvError, match=r"scontrol show hostnames 'n\[1-2\]' failed"):
        slurm.hostnames("n[1-2]")
