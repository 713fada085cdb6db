"""A failure keeps one line on the console and its whole traceback in a file (entry.run_entry, cli).

    python -m pytest tests/test_error_log.py -q
"""

from __future__ import annotations

import tempfile

from stackllama_ds import cli
from stackllama_ds.config import RunConfig
from stackllama_ds.run import entry


def _quantize(layer: int) -> None:
    raise ValueError(f"Blockwise quantization only supports 16/32-bit floats, but got torch.uint8 (layer {layer})")


def _stage(cfg: RunConfig) -> None:  # a stage whose model load fails deep inside a library
    _quantize(3)


def test_run_entry_keeps_the_traceback_in_the_ranks_error_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    cfg = RunConfig(output_root=str(tmp_path))
    assert entry.run_entry(_stage, cfg, "sft") == 1  # the exit code is unchanged
    log = tmp_path / "sft" / "errors" / "rank-0.log"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text
    assert "in _stage" in text and "in _quantize" in text  # the whole stack, not only the message
    assert "ValueError: Blockwise quantization only supports 16/32-bit floats" in text
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and str(log) in err

    # a second failure (a requeued job) is appended, not written over
    assert entry.run_entry(_stage, cfg, "sft") == 1
    assert log.read_text().count("Traceback (most recent call last)") == 2


def test_cli_keeps_the_traceback_of_a_library_error(tmp_path, capsys, monkeypatch):
    def failing_validate(args) -> int:
        _quantize(7)
        return 0

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(cli, "cmd_validate", failing_validate)
    assert cli.main(["validate", "cfg.yaml"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    [kept] = tmp_path.glob("stackllama-ds-validate-*.traceback")
    assert str(kept) in err
    text = kept.read_text()
    assert "Traceback (most recent call last)" in text and "in failing_validate" in text and "in _quantize" in text
