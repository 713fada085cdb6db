"""Plots of a run from its stages' ``metrics.jsonl`` files, and the Markdown of ``eval/report.md``.

    stackllama-ds report runs/tiny          # redraw runs/tiny/eval/*.png, for a finished or running job

Plots (PNG, matplotlib's Agg renderer through ``matplotlib.figure.Figure``, no pyplot state):
    sft_loss.png      sft/metrics.jsonl: loss per step, and eval_loss where logged
    rm_training.png   rm/metrics.jsonl: training ranking loss (loss_rank with a length head, else loss)
                      and accuracy per step with their moving averages (10 steps), ln 2 (chance) and 0.5 drawn
    rm_accuracy.png   rm/metrics.jsonl: eval_accuracy per step (rows holding a number there)
    ppo.png           ppo/metrics.jsonl: reward_mean with a +-1 std band (reward_std) and its moving
                      average, kl, kl_coef and response_len per step, one panel each
A missing file, or one without a usable row yet, skips its plot with a message; a partial file
(a line cut by a kill) is read up to the cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stackllama_ds.fsutil import atomic_file
from stackllama_ds.run.metrics import read_metrics


@dataclass(frozen=True)
class Panel:
    """One axes: ``keys`` plotted against ``step`` (each from the rows where it is a finite number)."""

    title: str
    keys: tuple[str, ...]
    ylim: tuple[float, float] | None = None
    smooth: int = 0  # also draw each key's trailing moving average over this many steps
    hline: tuple[float, str] | None = None  # a reference level and its label (ln 2: a chance-level RM)
    band: str | None = None  # a std key: the first key +- it, shaded
    first_only: bool = False  # plot only the first key that has points (alternatives, not companions)


@dataclass(frozen=True)
class Plot:
    filename: str
    stage: str
    panels: tuple[Panel, ...]


PLOTS: tuple[Plot, ...] = (
    Plot("sft_loss.png", "sft", (Panel("SFT loss", ("loss", "eval_loss")),)),
    # the ranking loss (loss_rank: a length head's ODIN terms are not in it; else loss is that loss)
    Plot("rm_training.png", "rm", (Panel("RM training loss (pairwise ranking)", ("loss_rank", "loss"), smooth=10,
                                         hline=(math.log(2), "ln 2"), first_only=True),
                                   Panel("RM training accuracy", ("accuracy",), ylim=(0.0, 1.0), smooth=10,
                                         hline=(0.5, "chance")))),
    Plot("rm_accuracy.png", "rm", (Panel("RM held-out accuracy", ("eval_accuracy",), ylim=(0.0, 1.0)),)),
    Plot("ppo.png", "ppo", (Panel("PPO reward (mean score, +-1 std over rollouts)", ("reward_mean",), smooth=5,
                                  band="reward_std"),
                            Panel("KL(policy || reference) per sequence", ("kl",)),
                            Panel("KL coefficient", ("kl_coef",)),
                            Panel("response length (tokens)", ("response_len",)))),
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


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean of the last ``window`` values at each point (fewer at the start): m_i = mean(y[max(0, i-w+1) .. i])."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def draw(plot: Plot, rows: list[dict], out: Path) -> bool:
    """Write ``out`` (PNG) for ``plot`` from metrics rows; False, and nothing written, when no series has a point."""
    from matplotlib.figure import Figure

    series = [[(k, *_series(rows, k)) for k in p.keys] for p in plot.panels]
    series = [[next(x for x in lines if x[1])] if p.first_only and any(x[1] for x in lines) else lines
              for p, lines in zip(plot.panels, series)]
    if not any(xs for panel in series for _, xs, _ in panel):
        return False
    fig = Figure(figsize=(6.4, 2.6 * len(plot.panels)), layout="constrained")
    axes = fig.subplots(len(plot.panels), 1, squeeze=False)[:, 0]
    for ax, panel, lines in zip(axes, plot.panels, series):
        for key, xs, ys in lines:
            if not xs:
                continue
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key,
                    alpha=0.45 if panel.smooth else 1.0)
            if panel.band and key == panel.keys[0]:
                bx, sd = _series(rows, panel.band)
                mean = dict(zip(xs, ys))
                pts = [(x, mean[x], d) for x, d in zip(bx, sd) if x in mean]
                if pts:
                    ax.fill_between([p[0] for p in pts], [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts],
                                    alpha=0.2, label=f"+-{panel.band}")
            if panel.smooth and len(ys) > 1:
                ax.plot(xs, moving_average(ys, panel.smooth), label=f"{key} ({panel.smooth}-step mean)")
        if panel.hline is not None:
            ax.axhline(panel.hline[0], color="grey", linestyle="--", linewidth=1, label=panel.hline[1])
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        if sum(1 for _, xs, _ in lines if xs) > 1 or panel.smooth or panel.hline or panel.band:
            ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:  # a reader never sees a half-written PNG
        fig.savefig(tmp, format="png", dpi=100)
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


def _ci(x: dict | None, digits: int = 3) -> str:
    """``mean [lo, hi]``; "n/a" for a figure that is missing or null (an empty subset)."""
    if not x or x.get("mean") is None:
        return "n/a"
    lo, hi = ("?" if x[k] is None else f"{x[k]:.{digits}f}" for k in ("lo", "hi"))
    return f"{x['mean']:.{digits}f} [{lo}, {hi}]"


def _lm_lines(lm: dict, pct: int) -> list[str]:
    """The "Did SFT learn?" section: held-out loss and perplexity per model, and the paired differences."""
    lines = ["", "## Held-out language-model loss", "",
             f"{lm['n_texts']} held-out answers (one per distinct question of {' then '.join(lm['splits'])}, "
             f"{lm['n_requested']} requested, {lm['n_too_long']} skipped as the question fills the "
             f"{lm['max_length']}-token window), {lm['n_tokens']} answer tokens: the loss counts only the answer "
             "tokens (and the closing EOS), the same tokens for every model; token-weighted mean NLL, "
             f"{pct}% bootstrap over texts.", "",
             "| model | loss, nats/token [CI] | perplexity [CI] |", "|---|---|---|"]
    for name, m in lm["models"].items():
        lines.append(f"| {name} | {_ci(m['loss'])} | {_ci(m['ppl'], 2)} |")
    if lm.get("diffs"):
        lines += ["", "| A - B | loss difference, nats/token [CI] (negative: A better) |", "|---|---|"]
        for d in lm["diffs"].values():
            lines.append(f"| {d['a']} - {d['b']} | {_ci(d)} |")
    return lines


def _rm_lines(rm: dict, pct: int) -> list[str]:
    """The reward model on held-out pairs, beside what length alone would score."""
    if "accuracy" not in rm:
        return ["", "## Reward model on held-out pairs", "", f"No `{rm['split']}` pair to score."]
    adv, t = rm["adversarial"], rm["truncation"]
    why = ("a text over the limit, or two identical texts" if rm["overlength"] == "filter"
           else "the two texts identical after the cut")
    unit = "questions" if rm.get("resample") == "question" else "pairs"
    return ["", "## Reward model on held-out pairs", "",
            f"{rm['n_pairs']} `{rm['split']}` pairs of {rm.get('n_questions')} questions "
            f"({rm['n_requested'] or 'all'} requested, {rm['n_available']} available; fitted into "
            f"{rm['max_length']} tokens: {t['whole']} whole, {t['question_cut']} with the question cut, "
            f"{t['answer_cut']} with an answer cut, {t['dropped']} left out: {why}); lengths in "
            f"{rm['length_unit']}; scored in {rm.get('dtype')}; ties count half; {pct}% bootstrap over {unit} "
            f"(per-pair scores in `rm_pairs.jsonl`).", "",
            "| figure | share [CI] | pairs |", "|---|---|---|",
            f"| RM accuracy: r(chosen) > r(rejected) | {_ci(rm['accuracy'])} | {rm['n_pairs']} "
            f"({rm['accuracy']['ties']} ties) |",
            f"| length baseline: the longer answer is preferred | {_ci(rm['length_baseline'])} | {rm['n_pairs']} "
            f"({rm['length_baseline'].get('ties')} of equal length) |",
            f"| RM accuracy where the preferred answer is shorter | {_ci(adv)} | {adv['n']} |",
            "", "A length-only reward scores the baseline overall and 0 on the shorter-preferred pairs.",
            *_rm_head_lines(rm.get("heads", {}))]


def _rm_head_lines(heads: dict) -> list[str]:
    """An ODIN reward model's heads side by side (nothing for a one-head model)."""
    if len(heads) < 2:
        return []

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return ["", "Heads of the reward model (ODIN; everything above uses quality, column 0), point figures:", "",
            "| head | accuracy | shorter preferred | Spearman(score, length) |", "|---|---|---|---|",
            *(f"| {name} | {num(h['accuracy'])} | {num(h['adversarial_accuracy'])} ({h['n_adversarial']}) | "
              f"{num(h['length_spearman'])} |" for name, h in heads.items())]


def _win_table(win_rates: dict) -> list[str]:
    """The win-rate table of eval.json's ``win_rates`` (the reward model's or the judge's)."""
    lines = ["| A vs B | win rate of A [CI] | wins / ties / losses | length-matched win rate [CI] | matched prompts |",
             "|---|---|---|---|---|"]
    for w in win_rates.values():
        lm = w.get("length_matched") or {}
        lines.append(f"| {w['a']} vs {w['b']} | {_ci(w)} | {w['wins']} / {w['ties']} / {w['losses']} | "
                     f"{_ci(lm)} | {lm.get('n', '-')} |")
    return lines


def render_markdown(res: dict, plots: list[str], n_samples: int = 4) -> str:
    """``eval/report.md`` from the ``eval.json`` dict: tables, KL, plots, samples side by side."""
    pct = round(100 * (1 - res["alpha"]))
    lines = [
        "# StackLLaMA evaluation",
        "",
        f"{res['n_prompts']} held-out prompts (the first distinct questions of `{res['split']}`; "
        f"{res['n_requested']} requested, {res['n_available']} available, {res.get('n_question_cut', 0)} with the "
        f"question cut to fit {res['max_prompt_length']} tokens, {res['n_too_long']} left out), plain sampling of up to {res['max_new_tokens']} new tokens "
        f"cut at the first EOS, seed {res['seed']}. Reward: raw score of `{res['reward_model']}`. "
        f"Intervals: {pct}% percentile bootstrap over prompts, {res['bootstrap_samples']} resamples.",
        "",
    ]
    if res["n_prompts"] < res["n_requested"]:
        lines += [f"**Note:** only {res['n_prompts']} of the {res['n_requested']} requested prompts were available.", ""]
    lines += [
        "| model | path | mean reward [CI] | mean length (tokens) | ended with EOS | degenerate "
        "| Spearman(reward, length) [CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        lines.append(f"| {name} | `{m['path']}` | {_ci(m['reward'])} | {m['length_mean']:.1f} | "
                     f"{m['eos_share']:.2f} | {m['degenerate_share']:.2f} | {_ci(m.get('length_reward_spearman'))} |")
    if res["win_rates"]:
        tol = res.get("length_match_tol", 0.2)
        lines += ["", "## Win rates", "",
                  "Share of prompts where A's response gets the higher reward; a tie counts half. Length-matched: "
                  f"the same on the prompts whose two responses' lengths la, lb satisfy |la - lb| <= {tol:g} * "
                  "max(la, lb) (tokens); a win that holds there is not a length effect.", ""]
        lines += _win_table(res["win_rates"])
    if res.get("judge"):
        lines += ["", "## Win rates by the independent judge", "",
                  f"The same responses scored by `{res['judge']['model']}`, a reward model trained from the base model "
                  "on preference pairs disjoint from the reward model's; a gain the judge does not see is the policy "
                  "exploiting its own reward model.", ""]
        lines += _win_table(res["judge"]["win_rates"])
    if res["kl"]:
        lines += ["", "## KL", "",
                  "Monte-Carlo KL(policy || ref): mean over the policy's own samples of "
                  "sum_t [log p_policy(y_t) - log p_ref(y_t)] (response tokens up to the first EOS).", "",
                  "| policy | ref | KL [CI] |", "|---|---|---|"]
        for k in res["kl"].values():
            lines.append(f"| {k['policy']} | {k['ref']} | {_ci(k)} |")
    if res.get("lm"):
        lines += _lm_lines(res["lm"], pct)
    if res.get("rm"):
        lines += _rm_lines(res["rm"], pct)
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
