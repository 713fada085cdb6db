"""``stackllama-ds ask``: one question, each model's answers side by side with their reward (the blog's demo).

    stackllama-ds ask runs/tiny "Which beer goes with spicy food?" --models base,sft,ppo --samples 2 --seed 0

Models, found from the run root (the stages keep no copy of the config there): ``RUN_ROOT/sft/model``,
``RUN_ROOT/ppo/model``, the reward model ``RUN_ROOT/rm/model``; the base model from ``--config``
(``RunLayout.base_model``, with ``output_root`` set to RUN_ROOT), else the base path that
``stackllama-ds eval`` recorded in ``RUN_ROOT/eval/eval.json``, else ``RUN_ROOT/tiny``. Missing
models are skipped with a note; one named in ``--models`` that exists nowhere is an error.

Sampling as in ``eval``: plain sampling (``engines.generate.sample``) of ``max_new_tokens`` tokens,
cut at the first EOS (``models.padding.cut_at_eos``), ``torch.manual_seed(seed)`` before each model
(common random numbers); the reward is the reward model's raw score of ``Question: q\\n\\nAnswer: a``.
One process, no DeepSpeed engine: fp32 on CPU, bf16 on a GPU (the config's ppo dtypes when given).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stackllama_ds.config import ModelConfig, RunConfig
from stackllama_ds.config_loader import load_config
from stackllama_ds.data.template import format_prompt

MODELS = ("base", "sft", "ppo")


@dataclass(frozen=True)
class Answer:
    """One sampled answer: ``sample`` counts from 0 per model; ``length`` in tokens up to and including EOS."""

    model: str
    sample: int
    text: str
    reward: float
    length: int
    eos: bool
    length_reward: float | None = None  # an ODIN reward model's length head (``reward`` is its quality head)


@dataclass(frozen=True)
class RunModels:
    paths: dict[str, Path]  # name -> HF folder, in MODELS order, existing ones only
    missing: dict[str, Path]  # name -> where it was looked for
    reward: Path
    model_cfg: ModelConfig
    dtypes: tuple[str, str]  # (policy, reward) on a GPU


def _is_model(p: Path) -> bool:
    return (p / "config.json").exists()


def find_models(run_root: Path, names: Sequence[str], config: str | None = None) -> RunModels:
    """Where each requested model of a run is (see the module docstring for the search order)."""
    run_root = Path(run_root)
    if not run_root.is_dir():
        raise FileNotFoundError(f"run root not found: {run_root}")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    cands = {n: run_root / n / "model" for n in ("sft", "ppo")}
    cfg: RunConfig | None = None
    if config is not None:
        cfg = load_config(config, check_files=False).model_copy(update={"output_root": str(run_root)})
    if "base" in names:
        cands["base"] = _base_path(run_root, cfg)
    paths = {n: cands[n] for n in MODELS if n in names and _is_model(cands[n])}
    missing = {n: cands[n] for n in names if n not in paths}
    if not paths:
        raise FileNotFoundError("no model to ask: " + ", ".join(f"{n} ({p})" for n, p in missing.items()))
    reward = run_root / "rm" / "model"
    if not _is_model(reward):
        raise FileNotFoundError(f"reward model not found: {reward} (run rm first)")
    mcfg = cfg.model if cfg is not None else ModelConfig()
    dtypes = (cfg.ppo.actor.dtype, cfg.ppo.reward.dtype) if cfg is not None else ("bf16", "bf16")
    return RunModels(paths, missing, reward, mcfg, dtypes)


def _base_path(run_root: Path, cfg: RunConfig | None) -> Path:
    if cfg is not None:
        from stackllama_ds.run.layout import RunLayout

        return RunLayout(cfg).base_model()
    ev = run_root / "eval" / "eval.json"
    if ev.exists():
        base = json.loads(ev.read_text()).get("models", {}).get("base", {}).get("path")
        if base:
            p = Path(base)
            return p if p.is_absolute() else run_root / p
    return run_root / "tiny"


@torch.no_grad()
def ask(run: RunModels, question: str, samples: int = 1, seed: int = 0, max_new_tokens: int = 128) -> list[Answer]:
    """``samples`` answers to ``question`` from every model of ``run``, each scored by the reward model."""
    from stackllama_ds.engines.dist import device, place
    from stackllama_ds.engines.generate import sample
    from stackllama_ds.models.load import load_causal_lm, load_reward_model, load_tokenizer
    from stackllama_ds.models.padding import cut_at_eos, pad
    from stackllama_ds.models.scoring import reward_head_scores

    dev = device()
    policy_dtype, reward_dtype = run.dtypes if dev.type == "cuda" else ("fp32", "fp32")
    texts: dict[str, tuple[list[str], list[int], list[bool]]] = {}
    for name, path in run.paths.items():
        tok = load_tokenizer(path)
        lm = place(load_causal_lm(path, run.model_cfg, dtype=policy_dtype, trainable=False).eval())
        ids, mask = (place(t) for t in pad([tok(format_prompt(question))["input_ids"]] * samples,
                                            tok.pad_token_id, "left"))  # (N, P)
        torch.manual_seed(seed)  # the same seed for every model: common random numbers
        r = sample(lm, ids, mask, max_new_tokens)  # (N, max_new_tokens)
        m = cut_at_eos(r, tok.eos_token_id)
        decoded = tok.batch_decode(r.masked_fill(m == 0, tok.pad_token_id).cpu(), skip_special_tokens=True)
        texts[name] = (decoded, m.sum(1).tolist(), (r == tok.eos_token_id).any(1).tolist())
        del lm
    tok = load_tokenizer(run.reward if (run.reward / "tokenizer_config.json").exists() else next(iter(run.paths.values())))
    reward = place(load_reward_model(run.reward, run.model_cfg, pad_token_id=tok.pad_token_id, dtype=reward_dtype).eval())
    out = []
    for name, (decoded, lengths, eos) in texts.items():
        scores = reward_head_scores(reward, tok, [question] * samples, decoded, dev).tolist()  # (N, K)
        out += [Answer(name, k, decoded[k], float(scores[k][0]), int(lengths[k]), bool(eos[k]),
                       float(scores[k][1]) if len(scores[k]) > 1 else None) for k in range(samples)]
    return out


def render(question: str, answers: list[Answer], width: int | None = None) -> None:
    """Print the answers as one rich table: model, sample, reward, length, answer."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Question: {question}", show_lines=True)
    two = any(a.length_reward is not None for a in answers)  # ODIN: quality and length heads side by side
    cols = ("model", "#", *(("quality", "length head") if two else ("reward",)), "tokens", "answer")
    for col in cols:
        table.add_column(col, **({"overflow": "fold", "ratio": 1} if col == "answer" else
                                 {} if col == "model" else {"justify": "right"}))
    for a in answers:
        heads = (f"{a.reward:+.3f}", f"{a.length_reward:+.3f}") if two else (f"{a.reward:+.3f}",)
        table.add_row(a.model, str(a.sample), *heads, f"{a.length}{'' if a.eos else '+'}", a.text or "(empty)")
    Console(width=width, soft_wrap=False).print(table)


def main(run_root: str, question: str, models: str | None = None, samples: int = 1, seed: int = 0,
         max_new_tokens: int = 128, config: str | None = None, json_out: str | None = None,
         width: int | None = None) -> int:
    """The ``ask`` subcommand; returns the exit code. ``models`` None: every model the run has."""
    if samples < 1 or max_new_tokens < 1:
        raise ValueError("--samples and --max-new-tokens must be >= 1")
    names = list(MODELS) if models is None else [n.strip() for n in models.split(",") if n.strip()]
    run = find_models(Path(run_root), names, config)
    for n, p in run.missing.items():
        if models is not None:  # asked for by name: an error, not a note
            raise FileNotFoundError(f"{n} model not found: {p}")
        print(f"ask: {n} skipped: no model at {p}")
    answers = ask(run, question, samples, seed, max_new_tokens)
    render(question, answers, width)
    two = any(a.length_reward is not None for a in answers)
    print(("quality, length head: the reward model's two heads (PPO reads quality)" if two else
           "reward: raw reward-model score") + "; tokens: answer length, '+' where no EOS came within --max-new-tokens")
    if json_out:
        Path(json_out).write_text(json.dumps([asdict(a) for a in answers], indent=1) + "\n")
    return 0
