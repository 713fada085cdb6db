"""bench/harness.py: rounds of sides (one after the other, or taking turns step by step), tables, FLOPs."""

from __future__ import annotations

import json
import sys
import threading

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import harness  # noqa: E402
import turns  # noqa: E402


def test_sequential_rounds_run_each_side_alone_in_order(tmp_path):
    calls: list[tuple[str, int, int]] = []

    def side(name: str, value: float):
        return lambda i, t: calls.append((name, i, t["n"])) or {"x": value + i, "rss": 1.0}

    res = harness.rounds(2, {"ours": side("ours", 10.0), "TRL": side("TRL", 5.0)}, str, together=False,
                         folder=tmp_path)
    assert calls == [("ours", 0, 1), ("TRL", 0, 1), ("ours", 1, 1), ("TRL", 1, 1)]
    assert [r["x"] for r in res["ours"]] == [10.0, 11.0]


def test_sides_together_take_turns_step_by_step_and_rotate_by_round(tmp_path):
    log: list[tuple[int, str, int]] = []
    lock = threading.Lock()

    def side(name: str):
        def run(i: int, t: dict) -> dict:
            turn = turns.Turns(t["folder"], t["index"], t["n"])
            for k in range(3):
                turn.wait()
                with lock:
                    log.append((i, name, k))
                turn.passed(hold=k == 2)
            return {"rss": 0.0, "times": turns.read_times(tmp_path, t["index"])}
        return run

    res = harness.rounds(2, {"a": side("a"), "b": side("b")}, lambda r: "", folder=tmp_path)
    assert [x[1:] for x in log if x[0] == 0] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert [x[1:] for x in log if x[0] == 1] == [("b", 0), ("a", 0), ("b", 1), ("a", 1), ("b", 2), ("a", 2)]
    assert len(res["a"][1]["times"]) == 3  # each step's seconds, written by the side's rank 0


def test_compare_table_ratios_for_throughput_and_time():
    res = {"ours": [{"v": 4.0, "rss": 100.0}, {"v": 6.0, "rss": 120.0}],
           "TRL": [{"v": 2.0, "rss": 90.0}, {"v": 4.0, "rss": 95.0}]}
    thr = harness.compare_table(res, "v", "tok/s", "T").splitlines()
    assert "ours/TRL" in thr[2]
    median = [c.strip() for c in thr[-1].strip("|").split("|")]
    assert median[:4] == ["median", "5", "3", "1.67"]  # median 5 / median 3
    assert median[4:] == ["120.0", "95.0"]  # peak RSS: max over rounds
    slow = harness.compare_table(res, "v", "s/step", "T", higher_is_better=False).splitlines()
    assert "speed-up vs TRL" in slow[2]
    assert [c.strip() for c in slow[-1].strip("|").split("|")][3] == "0.6"  # TRL 3 s / ours 5 s


def test_flops_full_fine_tuning_is_three_forwards_and_params_count(tmp_path):
    cfg = {**harness.BENCH_MODEL, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = harness.Shape.of(tmp_path)
    assert s.train(100, 100, 0) == 3 * s.fwd(100, 100)  # backward = input + weight gradients
    assert s.train(100, 0, 1000) < 3 * s.fwd(100, 0, 1000)  # LoRA: the frozen base has no weight gradients
    assert round(harness.n_params(tmp_path) / 1e5) == 341  # the 34.1M benchmark Llama
