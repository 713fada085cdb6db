"""The benchmarks' shared table: rounds alternate sides, ratios read "> 1 = ours better" both ways."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import common  # noqa: E402


def test_alternate_runs_sides_in_order_each_round():
    calls: list[tuple[str, int]] = []
    res = common.alternate(2, {
        "ours": lambda i: calls.append(("ours", i)) or {"x": 10.0 + i, "rss": 1.0},
        "TRL": lambda i: calls.append(("TRL", i)) or {"x": 5.0, "rss": 2.0},
    }, lambda r: f"{r['x']}")
    assert calls == [("ours", 0), ("TRL", 0), ("ours", 1), ("TRL", 1)]
    assert [r["x"] for r in res["ours"]] == [10.0, 11.0]


def test_compare_table_ratios_for_throughput_and_time():
    res = {"ours": [{"v": 4.0, "rss": 100.0}, {"v": 6.0, "rss": 120.0}],
           "TRL": [{"v": 2.0, "rss": 90.0}, {"v": 4.0, "rss": 95.0}]}
    thr = common.compare_table(res, "v", "tok/s", "T").splitlines()
    assert "ours/TRL" in thr[2]
    median = [c.strip() for c in thr[-1].strip("|").split("|")]
    assert median[:4] == ["median", "5", "3", "1.67"]  # median 5 / median 3
    assert median[4:] == ["120.0", "95.0"]  # peak RSS: max over rounds
    slow = common.compare_table(res, "v", "s/step", "T", higher_is_better=False).splitlines()
    assert "speed-up vs TRL" in slow[2]
    assert [c.strip() for c in slow[-1].strip("|").split("|")][3] == "0.6"  # TRL 3 s / ours 5 s


def test_peer_sides_ours_then_peer_then_peer_with_heap():
    calls = []
    sides = common.peer_sides(lambda i: {"who": "ours"}, lambda i, heap: calls.append((i, heap)) or {}, heap=True)
    assert list(sides) == ["ours", "TRL", "TRL+heap"]
    sides["TRL"](0), sides["TRL+heap"](1)
    assert calls == [(0, False), (1, True)]
    assert list(common.peer_sides(lambda i: {}, lambda i, heap: {}, heap=False)) == ["ours", "TRL"]
    assert list(common.peer_sides(lambda i: {}, None, heap=True)) == ["ours"]  # peer could not be set up
