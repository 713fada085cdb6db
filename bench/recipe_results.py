"""The results tables of one full recipe run (bench/RESULTS.md), from its run root and pipeline log.

    stackllama-ds pipeline configs/smollm2.yaml > runs/smollm2.log 2>&1
    .venv/bin/python bench/recipe_results.py runs/smollm2 runs/smollm2.log

Markdown: the machine, wall time per stage (the log's "[pipeline] STAGE: done in Ns" lines, summed over
concatenated logs of resumed runs), every learning figure of eval/eval.json with its 95% interval.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path


def _ci(d: dict | None, fmt: str = "{:.3f}") -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return f"{fmt.format(d['mean'])} [{fmt.format(d['lo'])}, {fmt.format(d['hi'])}]"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _wins(rates: dict) -> list[str]:
    rows = ["| win rate | all prompts [95% CI] | length-matched (within 20%) [95% CI] | n matched |",
            "|---|---|---|---|"]
    return rows + [f"| {name} | {_ci(w)} | {_ci(w.get('length_matched', {}))} | "
                   f"{w.get('length_matched', {}).get('n')} |" for name, w in rates.items()]


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", out)
    flags = re.search(r"Flags:\s*(.+)", out)
    f = set(flags.group(1).split()) if flags else set()
    units = [x for x in ("amx_bf16", "avx512_bf16", "avx2") if x in f]
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{name.group(1).strip() if name else 'unknown CPU'}, {cores} cores, flags {'/'.join(units)}"


def stage_times(log: Path) -> dict[str, int]:
    text = log.read_text(errors="replace") if log.exists() else ""
    out: dict[str, int] = {}
    for m in re.finditer(r"\[pipeline\] (\w+): done in (\d+)s", text):  # a resumed stage adds up
        out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
    return out


def table(root: Path, log: Path) -> str:
    ev = json.loads((root / "eval" / "eval.json").read_text())
    acc_path = root / "rm" / "accuracy.json"
    acc = json.loads(acc_path.read_text()) if acc_path.exists() else {}
    times = stage_times(log)
    rows = [f"Machine: {machine()}.", "",
            "| stage | wall time |", "|---|---|"]
    rows += [f"| {s} | {t / 60:.1f} min |" for s, t in times.items()]
    rows += [f"| total | {sum(times.values()) / 60:.1f} min |", ""]
    lm, rm = ev.get("lm", {}), ev.get("rm", {})
    rows += [f"SFT: held-out answer tokens ({lm.get('n_texts')} texts, {lm.get('n_tokens')} tokens), "
             "nats/token:", "", "| model | loss [95% CI] | perplexity |", "|---|---|---|"]
    for name, m in lm.get("models", {}).items():
        rows.append(f"| {name} | {_ci(m['loss'])} | {_ci(m['ppl'], '{:.1f}')} |")
    for name, d in lm.get("diffs", {}).items():
        rows.append(f"| {name} (difference) | {_ci(d)} | |")
    t = rm.get("truncation", {})
    rows += ["", f"Reward model on {rm.get('n_pairs')} held-out rm_eval pairs ({rm.get('n_questions')} "
             f"questions; cut to {rm.get('max_length')} tokens: {t.get('whole')} whole, "
             f"{t.get('question_cut')} question cut, {t.get('answer_cut')} answer cut, {t.get('dropped')} "
             f"dropped), scored by `eval` in {rm.get('dtype')}; ties half; 95% bootstrap over questions:", "",
             "| figure | value [95% CI] |", "|---|---|",
             f"| accuracy (quality head) | {_ci(rm.get('accuracy'))} |",
             "| length baseline (longer answer wins, answers as scored) | "
             f"{_ci(rm.get('length_baseline'))} |",
             f"| accuracy on the length-adversarial subset (n = {rm.get('adversarial', {}).get('n')}) "
             f"| {_ci(rm.get('adversarial'))} |"]
    if held := acc.get("held_out"):
        rows.append(f"| RM stage's own held-out accuracy, same pairs ({held.get('dtype')}) | "
                    f"{_ci(held.get('accuracy'))} |")
    if heads := rm.get("heads"):
        rows += ["", "| head | accuracy | accuracy, length-adversarial | Spearman(score, answer length) |",
                 "|---|---|---|---|"]
        for h, f in heads.items():
            rows.append(f"| {h} | {_num(f.get('accuracy'))} | {_num(f.get('adversarial_accuracy'))} | "
                        f"{_num(f.get('length_spearman'))} |")
    judge_acc = root / "judge" / "accuracy.json"
    if judge_acc.exists():
        jh = json.loads(judge_acc.read_text()).get("held_out") or {}
        rows += ["", f"Independent judge (sft split's pairs, from the base model) on the same held-out pairs "
                 f"({jh.get('dtype')}): accuracy {_ci(jh.get('accuracy'))}, length baseline "
                 f"{_ci(jh.get('length_baseline'))}, length-adversarial {_ci(jh.get('adversarial'))}"]
    metrics = root / "ppo" / "metrics.jsonl"
    ppo_rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() \
        else []
    if len(ppo_rows) >= 4:
        k = max(1, len(ppo_rows) // 4)
        first, last = ppo_rows[:k], ppo_rows[-k:]

        def mean(rs: list[dict], key: str) -> float:
            return sum(r[key] for r in rs) / len(rs)

        rows += ["", f"PPO rollouts ({len(ppo_rows)} steps): mean reward of the first {k} steps "
                 f"{mean(first, 'reward_mean'):.3f}, of the last {k} {mean(last, 'reward_mean'):.3f}; "
                 f"KL {mean(first, 'kl'):.2f} -> {mean(last, 'kl'):.2f} nats; response length "
                 f"{mean(first, 'response_len'):.1f} -> {mean(last, 'response_len'):.1f} tokens"]
    rows += ["", f"Generation on {ev['n_prompts']} held-out rl_eval prompts, {ev['max_new_tokens']} new "
             "tokens, plain sampling:", "",
             "| model | reward [95% CI] | length (tokens) | Spearman(reward, length) | degenerate | EOS |",
             "|---|---|---|---|---|---|"]
    for name, m in ev["models"].items():
        rows.append(f"| {name} | {_ci(m['reward'])} | {m['length_mean']:.1f} | "
                    f"{_ci(m.get('length_reward_spearman'))} | {m['degenerate_share']:.3f} | "
                    f"{m['eos_share']:.2f} |")
    rows += ["", *_wins(ev["win_rates"])]
    if judge := ev.get("judge"):
        rows += ["", f"Win rates judged by the independent judge (`{judge.get('model')}`):", "",
                 *_wins(judge.get("win_rates", {}))]
    for name, k in ev.get("kl", {}).items():
        rows += ["", f"KL {name} (nats per response, Monte-Carlo on the policy's samples): {_ci(k)}"]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_root", type=Path)
    ap.add_argument("log", type=Path)
    a = ap.parse_args()
    print(table(a.run_root, a.log))


if __name__ == "__main__":
    main()
