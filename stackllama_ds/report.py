"""Plots of a run from its stages' ``metrics.jsonl`` files, and the Markdown of ``eval/report.md``.

    stackllama-ds report runs/tiny          # redraw runs/tiny/eval/*.png, for a finished or running job

Plots (PNG, matplotlib's Agg renderer through ``matplotlib.figure.Figure``, no pyplot state):
    sft_loss.png      sft/metrics.jsonl: loss per step, and eval_loss where logged
    rm_accuracy.png   rm/metrics.jsonl: eval_accuracy per step (rows holding a number there)
    ppo.png           ppo/metrics.jsonl: reward_mean, kl and kl_coef per step, one panel each
A missing file, or one without a usable row yet, skips its plot with a message; a partial file
(a line cut by a kill) is read up to the cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stackllama_ds.metrics import read_metrics


@dataclass(frozen=True)
class Panel:
    """One axes: ``keys`` plotted against ``step`` (each from the rows where it is a finite number)."""

    title: str
    keys: tuple[str, ...]
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class Plot:
    filename: str
    stage: str
    panels: tuple[Panel, ...]


PLOTS: tuple[Plot, ...] = (
    Plot("sft_loss.png", "sft", (Panel("SFT loss", ("loss", "eval_loss")),)),
    Plot("rm_accuracy.png", "rm", (Panel("RM held-out accuracy", ("eval_accuracy",), ylim=(0.0, 1.0)),)),
    Plot("ppo.png", "ppo", (Panel("PPO reward (mean score)", ("reward_mean",)),
                            Panel("KL(policy || reference) per sequence", ("kl",)),
                            Panel("KL coefficient", ("kl_coef",)))),
)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows holding a finite number under ``key`` (None, "nan", bools skipped)."""
    xs, ys = [], []
    for r in rows:
        v, s = r.get(key), r.get("step")
        if isinstance(v, bool) or not isinstance(v, int | float) or not isinstance(s, int | float):
            continue
        if math.isfinite(v):
            xs.append(float(s))
            ys.append(float(v))
    return xs, ys


def draw(plot: Plot, rows: list[dict], out: Path) -> bool:
    """Write ``out`` (PNG) for ``plot`` from metrics rows; False, and nothing written, when no series has a point."""
    from matplotlib.figure import Figure

    series = [[(k, *_series(rows, k)) for k in p.keys] for p in plot.panels]
    if not any(xs for panel in series for _, xs, _ in panel):
        return False
    fig = Figure(figsize=(6.4, 2.6 * len(plot.panels)), layout="constrained")
    axes = fig.subplots(len(plot.panels), 1, squeeze=False)[:, 0]
    for ax, panel, lines in zip(axes, plot.panels, series):
        for key, xs, ys in lines:
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        if sum(1 for _, xs, _ in lines if xs) > 1:
            ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(out)  # a reader never sees a half-written PNG
    return True


def redraw(run_root: Path, out_dir: Path | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Redraw every plot of ``run_root`` into ``out_dir`` (default ``run_root/eval``); returns the PNGs written."""
    run_root = Path(run_root)
    if not run_root.is_dir():
        raise FileNotFoundError(f"run root not found: {run_root}")
    out_dir = Path(out_dir) if out_dir is not None else run_root / "eval"
    written = []
    for plot in PLOTS:
        src = run_root / plot.stage / "metrics.jsonl"
        if not src.exists():
            log(f"report: {plot.filename} skipped: {src} not found")
            continue
        rows = read_metrics(src)
        if draw(plot, rows, out_dir / plot.filename):
            written.append(out_dir / plot.filename)
        else:
            keys = ", ".join(k for p in plot.panels for k in p.keys)
            log(f"report: {plot.filename} skipped: no row of {src} has a number under {keys} yet")
    return written


# ---------------------------------------------------------------------------------- report.md
def _cell(text: str, limit: int) -> str:
    """One Markdown table cell: newlines as <br>, pipes escaped, cut to ``limit`` characters."""
    t = text if len(text) <= limit else text[:limit] + " ..."
    return t.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"


def _ci(x: dict, digits: int = 3) -> str:
    return f"{x['mean']:.{digits}f} [{x['lo']:.{digits}f}, {x['hi']:.{digits}f}]"


def render_markdown(res: dict, plots: list[str], n_samples: int = 4) -> str:
    """``eval/report.md`` from the ``eval.json`` dict: tables, KL, plots, samples side by side."""
    pct = round(100 * (1 - res["alpha"]))
    lines = [
        "# StackLLaMA evaluation",
        "",
        f"{res['n_prompts']} held-out prompts (the first distinct questions of `{res['split']}`; "
        f"{res['n_requested']} requested, {res['n_available']} available, {res['n_too_long']} longer than "
        f"{res['max_prompt_length']} tokens left out), plain sampling of up to {res['max_new_tokens']} new tokens "
        f"cut at the first EOS, seed {res['seed']}. Reward: raw score of `{res['reward_model']}`. "
        f"Intervals: {pct}% percentile bootstrap over prompts, {res['bootstrap_samples']} resamples.",
        "",
    ]
    if res["n_prompts"] < res["n_requested"]:
        lines += [f"**Note:** only {res['n_prompts']} of the {res['n_requested']} requested prompts were available.", ""]
    lines += [
        "| model | path | mean reward [CI] | mean length (tokens) | ended with EOS | degenerate |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        lines.append(f"| {name} | `{m['path']}` | {_ci(m['reward'])} | {m['length_mean']:.1f} | "
                     f"{m['eos_share']:.2f} | {m['degenerate_share']:.2f} |")
    if res["win_rates"]:
        lines += ["", "## Win rates", "",
                  "Share of prompts where A's response gets the higher reward; a tie counts half.", "",
                  "| A vs B | win rate of A [CI] | wins / ties / losses |", "|---|---|---|"]
        for w in res["win_rates"].values():
            lines.append(f"| {w['a']} vs {w['b']} | {_ci(w)} | {w['wins']} / {w['ties']} / {w['losses']} |")
    if res["kl"]:
        lines += ["", "## KL", "",
                  "Monte-Carlo KL(policy || ref): mean over the policy's own samples of "
                  "sum_t [log p_policy(y_t) - log p_ref(y_t)] (response tokens up to the first EOS).", "",
                  "| policy | ref | KL [CI] |", "|---|---|---|"]
        for k in res["kl"].values():
            lines.append(f"| {k['policy']} | {k['ref']} | {_ci(k)} |")
    if plots:
        lines += ["", "## Training curves", ""] + [f"![{p}]({p})" for p in plots]
    names = list(res["models"])
    lines += ["", "## Samples", ""]
    for s in res["samples"][:n_samples]:
        lines += [f"**Prompt {s['index']}.** {_cell(s['question'], 600)}", "",
                  "| model | reward | length | answer |", "|---|---|---|---|"]
        for n in names:
            r = s["responses"][n]
            lines.append(f"| {n} | {r['reward']:+.3f} | {r['length']} | {_cell(r['text'], 800)} |")
        lines.append("")
    return "\n".join(lines) + "\n"
