"""The RM loop learns: 2-rank runs of ``stackllama-ds rm`` over-fit 32 real beer pairs, in bf16 and fp32.

    python -m pytest tests/stages/test_rm_overfit.py -q

A loop that does not learn (no optimizer step, a detached loss, chosen and rejected swapped, updates
that never reach the weights the forward uses) cannot rank every one of 32 fixed pairs right with a
loss far below ln 2 = 0.693, the loss of a model that cannot tell chosen from rejected. ~35 s per
dtype on a 2-core CPU, most of it launching the ranks and exporting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stackllama_ds.hardware import cpu_has_native_bf16
from stackllama_ds.run.metrics import read_metrics
from tests.conftest import run_cli, write_config

N_PAIRS = 32
MAX_LENGTH = 256
MICRO = 4  # pairs per rank per step: 2 ranks -> 8 pairs a step, 4 steps an epoch
EPOCHS = 20
STEPS = EPOCHS * N_PAIRS // (2 * MICRO)


@pytest.fixture(scope="module")
def overfit_data(prepared_root, tmp_path_factory) -> Path:
    """The prepared beer data with rm_train cut to its first 32 pairs whose two texts fit whole in
    MAX_LENGTH tokens (8 to spare), and rm_eval = 8 of those pairs (scored in eval mode at the end)."""
    from stackllama_ds.data.prepare import load_prepared
    from stackllama_ds.data.template import format_qa
    from stackllama_ds.models.load import load_tokenizer

    tok = load_tokenizer(prepared_root / "tiny")
    data = load_prepared(prepared_root / "data")
    tr = data["rm_train"]

    def fits(r: dict) -> bool:
        return all(len(tok(format_qa(r["question"], r[a])).input_ids) <= MAX_LENGTH - 8 for a in ("response_j", "response_k"))

    keep = [i for i, r in enumerate(tr) if fits(r)][:N_PAIRS]
    assert len(keep) == N_PAIRS
    data["rm_train"] = tr.select(keep)
    data["rm_eval"] = tr.select(keep[:8])
    out = tmp_path_factory.mktemp("overfit") / "data"
    data.save_to_disk(str(out))
    (out / "report.json").write_text((prepared_root / "data" / "report.json").read_text())
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_rm_overfits_32_pairs(dtype, prepared_root, overfit_data, tmp_path):
    if dtype == "bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no avx512_bf16/amx_bf16: bf16 matmuls are emulated, tens of times slower")
    root = tmp_path / "run"
    root.mkdir()
    (root / "data").symlink_to(overfit_data)
    (root / "tiny").symlink_to(prepared_root / "tiny")
    rm = {"init_from": str(root / "tiny"), "max_length": MAX_LENGTH, "overlength": "filter", "max_steps": STEPS,
          "eval_every": STEPS, "save_every": STEPS,
          "engine": {"zero_stage": 2, "dtype": dtype, "micro_batch_size": MICRO},
          "optim": {"lr": 2e-3, "warmup_steps": 0, "weight_decay": 0.0, "scheduler": "cosine"}}
    r = run_cli("rm", write_config(root / "cfg.yaml", root, rm=rm))
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(root / "rm" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert rows[0]["train_pairs"] == N_PAIRS  # every pair fits: none filtered
    last_epoch = rows[-N_PAIRS // (2 * MICRO):]  # each pair once (pair_batches: one permutation per pass)
    print(f"{dtype}: first loss {rows[0]['loss']:.3f}, last epoch loss {[round(x['loss'], 4) for x in last_epoch]}")
    assert rows[0]["loss"] > 0.5  # it starts near ln 2: the fit below is learnt
    assert all(row["accuracy"] == 1.0 for row in last_epoch)
    assert max(row["loss"] for row in last_epoch) < 0.1
    acc = json.loads((root / "rm" / "accuracy.json").read_text())
    assert acc["n_pairs"] == 8 and acc["accuracy"] == 1.0  # the export's scores, eval mode, rank them all too
