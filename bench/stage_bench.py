"""Our SFT / RM / PPO stages against TRL and against themselves, on the same work, side by side.

    python bench/stage_bench.py --stage sft              # tokens/s vs TRL 1.16 SFTTrainer (packing)
    python bench/stage_bench.py --stage rm [--rm-padded] # pairs/s vs TRL 1.16 RewardTrainer (+ ours padded)
    python bench/stage_bench.py --stage ppo              # step time vs TRL 0.11.4 PPOTrainer
    python bench/stage_bench.py --stage sft-scaling      # ours on 1 rank x 1 core, 1 x 2 cores, 2 x 1 core
    python bench/stage_bench.py --stage ppo-scaling
    python bench/stage_bench.py --stage zero3-gen --model bench --sequential  # gather-once vs partitioned

--model smollm2 (default): SmolLM2-135M-Instruct with LoRA as configs/smollm2.yaml, the beer dump with its
splits (rm_eval cut to 2%: our RM evaluates all of it, untimed but slow). --model bench: the 34M benchmark
Llama, full fine-tuning, configs/tiny.yaml at the earlier benchmarks' shapes. Ours is the stage run by the
CLI with only the benchmark's overrides; the peers (bench/peer.py) take model, data in our order, lengths,
batch, optimizer, LoRA and precision from our run's validated config. The sides start at once and take
turns step by step (bench/turns.py, bench/turnhook/) unless --sequential; a step is timed from its start to
its end; the ceiling is a matmul side at the step's shapes, taking turns too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import turns  # noqa: E402

HERE = Path(__file__).resolve().parent
SROOT = h.OUT / "smol"  # the beer dump prepared with smollm2.yaml's splits
BENCH_RM_EVAL = 0.02
PHASE = {"sft": "training", "rm": "training", "ppo": "actor generation"}  # the beat that opens a step
PHASES = ("t_generate", "t_score", "t_logprobs", "t_train")
TARGETS = {"sft": 1.5, "rm": 1.5, "ppo": 2.0}  # issue 16: speed-up over the peer
CEILING_TARGET, RSS_TARGET = 0.5, 1.10  # issue 16: share of the ceiling, peak RSS over the peer's


# ------------------------------------------------------------------------------------ setup
def model_dir(a) -> Path:
    if a.model == "bench":
        return h.ensure_root() / "tiny"
    from stackllama_ds.models.fetch import fetch_model

    return fetch_model("smollm2-135m", log=h.log)


def data_dir(a) -> Path:
    if a.model == "bench":
        return h.ensure_root() / "data"
    if not (SROOT / "DATA_DONE").exists():
        from stackllama_ds.config_loader import load_config
        from stackllama_ds.data.prepare import prepare

        cfg = load_config(h.SMOL_YAML, check_files=False)
        sp = cfg.data.splits
        sp.rl_eval, sp.rm_eval = sp.rl_eval + sp.rm_eval - BENCH_RM_EVAL, BENCH_RM_EVAL
        h.log("[bench] preparing the beer dump with smollm2.yaml's splits ...")
        h.rmtree(SROOT / "data")
        prepare(h.BEER, SROOT / "data", cfg=cfg.data, seed=cfg.seed, log=lambda *a, **k: None)
        (SROOT / "DATA_DONE").write_text(f"prepare, rm_eval {BENCH_RM_EVAL}\n")
    return SROOT / "data"


def sections(a, stage: str, nproc: int, zero: int, extra: dict) -> dict:
    """The config overrides of one of our runs: the model's, the benchmark's, then ``extra``."""
    dt, rm = {"dtype": a.dtype}, {"init_from": str(model_dir(a))}
    model = {"rm": rm}
    if a.model == "bench":
        off, eng = {"enabled": False}, {"gradient_accumulation_steps": 1}
        model = {"model": {"tiny": h.BENCH_MODEL},
                 "sft": {"seq_length": 256, "engine": {**eng, "micro_batch_size": 2},
                         "optim": {"lr": 3e-4, "warmup_steps": 2}, "lora": off},
                 "rm": {**rm, "max_length": 256, "engine": {**eng, "micro_batch_size": 4}, "lora": off},
                 "ppo": {"batch_size": 8, "mini_batch_size": 2, "gradient_accumulation_steps": 1,
                         "ppo_epochs": 2, "max_prompt_length": 128, "optim": {"lr": 1.41e-5}, "lora": off}}
    z, once = {"zero_stage": zero, **dt}, {"eval_every": 10_000, "save_every": 10_000}
    run = {"sft": {"max_steps": a.steps, **once, "eval_batches": 1, "engine": z},
           "rm": {"max_steps": a.steps, **once, "overlength": "filter", "engine": z},
           "ppo": {"steps": a.steps, "response_min_length": a.response_len,
                   "response_max_length": a.response_len, "early_stopping": False, "save_every": 10_000,
                   "log_samples": 0, "actor": z, "critic": z, "reference": dt, "reward": dt}}[stage]
    if stage == "sft" and a.micro_batch:
        run["engine"] = {**z, "micro_batch_size": a.micro_batch}
    # a rank waits out the other sides' steps on a busy box: no hang watchdog within the hour
    launch = {"launch": {"nproc_per_node": nproc, "hang_timeout_s": 3600}}
    return h.merge(h.merge(model, {stage: run, **launch}), {stage: extra})


def our_config(a, stage: str, tag: str, nproc: int = 1, zero: int | None = None, **extra) -> Path:
    links = {"data": data_dir(a), **({"tiny": model_dir(a)} if a.model == "bench" else {})}
    if stage == "ppo":  # the SFT model is the policy, the reward model a fresh score head on it
        links.update({"sft/model": model_dir(a), "rm/model": model_dir(a)})
    yaml_path = h.TINY_YAML if a.model == "bench" else h.SMOL_YAML
    return h.write_config(h.OUT / f"{a.model}-{stage}-{tag}", yaml_path, links,
                          **sections(a, stage, nproc, a.zero if zero is None else zero, extra))


def validated(a, stage: str):
    """Our 1-rank run's validated config (what the peer's spec is made of)."""
    from stackllama_ds.config_loader import load_config

    path = our_config(a, stage, "spec")
    cfg = load_config(path, check_files=False)
    h.rmtree(path.parent)
    return cfg


def sft_texts(a) -> Path:
    from stackllama_ds.data.prepare import load_prepared, sft_texts

    path = h.OUT / f"{a.model}-sft_texts.jsonl"
    if not path.exists():
        texts = sft_texts(load_prepared(data_dir(a))["sft"])
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def pairs_file(a, max_length: int) -> Path:
    """rm_train pairs whose two texts fit ``max_length`` tokens: what ``overlength: filter`` keeps."""
    from stackllama_ds.data.prepare import load_prepared
    from stackllama_ds.data.template import format_qa
    from stackllama_ds.models.load import load_tokenizer

    path = h.OUT / f"{a.model}-rm_pairs_{max_length}.jsonl"
    if not path.exists():
        tok, split = load_tokenizer(model_dir(a)), load_prepared(data_dir(a))["rm_train"]
        lines = []
        for q, j, k in zip(split["question"], split["response_j"], split["response_k"]):
            cj, ck = format_qa(q, j), format_qa(q, k)
            ids = tok([cj, ck])["input_ids"]
            if max(map(len, ids)) <= max_length:
                lines.append(json.dumps({"chosen": cj, "rejected": ck, "ids": ids}) + "\n")
        path.write_text("".join(lines))
    return path


def peer_spec(a, stage: str, cfg) -> dict:
    """What the peer runs, from our validated config: for RM our 1-rank run's pairs in its order
    (``epoch_order`` over the filtered pairs), for PPO the prompts our run draws at each step."""
    st = getattr(cfg, stage)
    lo, o = st.lora, st.optim
    lora = {"r": lo.r, "alpha": lo.alpha, "dropout": lo.dropout, "target_modules": list(lo.target_modules)}
    spec = {"model": str(model_dir(a)), "dtype": a.dtype, "base_dtype": a.peer_base, "threads": a.threads,
            "lora": lora if lo.enabled else None}
    if stage == "ppo":
        from stackllama_ds.data.prompts import load_prompts, prompt_batch
        from stackllama_ds.models.load import load_tokenizer

        qs, ids, _ = load_prompts(data_dir(a), load_tokenizer(model_dir(a)), "rl_train", st.max_prompt_length)
        B = st.batch_size
        batches = (prompt_batch(len(qs), s * B, B, 0, 1, cfg.seed) for s in range(a.steps))
        steps = [{"prompt_ids": [ids[i] for i in idx], "questions": [qs[i] for i in idx]} for idx in batches]
        return {**spec, "lr": o.lr, "batch_size": st.batch_size, "mini_batch_size": st.mini_batch_size,
                "ppo_epochs": st.ppo_epochs, "response_len": a.response_len,
                "max_grad_norm": st.actor.gradient_clipping, "steps": steps}
    mb = st.engine.micro_batch_size
    spec.update(steps=a.steps, micro_batch=mb, lr=o.lr, weight_decay=o.weight_decay, betas=list(o.betas),
                scheduler=o.scheduler, warmup_steps=o.warmup_steps,
                gradient_checkpointing=a.peer_checkpointing)
    if stage == "sft":
        return {**spec, "seq_length": st.seq_length, "data": str(sft_texts(a)),
                "per_step": mb * st.seq_length}
    from stackllama_ds.data.packing import epoch_order

    pairs = pairs_file(a, st.max_length)
    n, need = sum(1 for _ in open(pairs)), a.steps * mb
    assert need <= n, "one pass of the pairs is enough for the benchmark"
    return {**spec, "seq_length": st.max_length, "data": str(pairs),
            "order": epoch_order(n, cfg.seed, 0)[:need], "per_step": mb}


# ------------------------------------------------------------------------------------ sides
def ours(a, stage: str, tag: str, turn: h.Turn, nproc: int = 1, threads: int | None = None,
         zero: int | None = None, **extra) -> dict:
    """Our stage through the CLI in fresh processes, gated step by step: seconds per step ``s``, ``rate``
    (tokens, pairs or rollouts per second over all ranks), peak RSS; PPO also its phases."""
    from stackllama_ds.config_loader import load_config

    cfg = our_config(a, stage, tag, nproc, zero, **extra)
    env = {"BENCH_TURNS": json.dumps(turn), "BENCH_TURN_PHASE": PHASE[stage],
           "PYTHONPATH": f"{HERE / 'turnhook'}{os.pathsep}{h.REPO}"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r, rss = h.run_measured([sys.executable, "-m", "stackllama_ds.cli", stage, str(cfg)], extra_env=env)
    h.check(r, f"our {stage} ({tag})")
    steps = h.timed(turns.read_times(Path(turn["folder"]), turn["index"]), a.warmup, drop_last=stage != "ppo")
    c, s = load_config(cfg, check_files=False), sum(steps) / len(steps)
    out = {"s": s, "rss": rss}
    if stage == "ppo":
        rows = [x for x in h.read_jsonl(cfg.parent / "ppo" / "metrics.jsonl") if "t_generate" in x]
        rows = rows[a.warmup:a.warmup + len(steps)]
        out.update({k: sum(x[k] for x in rows) / len(rows) for k in PHASES})
        # the stage's t_generate starts before the turn gate: generation = the step less the other phases
        # (so it also holds GAE, whitening and the statistics, a few ms)
        out["t_generate"] = s - sum(out[k] for k in PHASES[1:])
        out["rate"] = c.ppo.batch_size * nproc / s
    else:
        eng = getattr(c, stage).engine
        out["rate"] = eng.micro_batch_size * (c.sft.seq_length if stage == "sft" else 1) * nproc / s
    h.rmtree(cfg.parent)
    return out


def other(a, kind: str, spec: dict, tag: str, turn: h.Turn, heap: bool = False) -> dict:
    """A side of bench/peer.py: a TRL trainer (in its peer's venv) or the matmul probe (here); ``heap``: with
    our launcher's glibc heap settings."""
    from stackllama_ds.launcher.spawn import MALLOC_ENV

    out = h.OUT / f"peer-{kind}-{tag}"
    h.rmtree(out)
    out.mkdir(parents=True)
    (out / "spec.json").write_text(json.dumps({**spec, "out": str(out), "turns": turn}))
    py = sys.executable if kind == "matmul" else h.peer_python("trl011" if kind == "ppo" else "trl116")
    r, rss = h.run_measured([str(py), str(HERE / "peer.py"), kind, str(out / "spec.json")],
                            extra_env=dict(MALLOC_ENV) if heap else None)
    h.check(r, f"{kind} side ({tag})")
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("@@RESULT "))[9:])
    h.rmtree(out)
    if kind == "matmul":
        kept = h.timed(res["turns"], a.warmup, spec["drop_last"])
        return {"rate": sum(x["flops"] for x in kept) / sum(x["t"] for x in kept), "rss": rss}
    if kind == "ppo":
        rows = res["rows"][a.warmup:]
        o = {k: sum(x[k] for x in rows) / len(rows) for k in ("t_generate", "t_score", "t_step", "total")}
        return {**o, "s": o["total"], "rate": spec["batch_size"] / o["total"], "rss": rss, "info": res}
    steps = h.timed(res["times"], a.warmup, drop_last=True)  # the same steps as ours
    s = sum(steps) / len(steps)
    return {"s": s, "rate": spec["per_step"] / s, "rss": rss, "info": res}


def with_peers(a, stage: str, spec: dict, sides: dict, probe: dict) -> dict:
    """``sides`` + TRL (+ TRL with our heap settings) + the matmul probe of ``probe``'s shapes."""
    sides["TRL"] = lambda i, t: other(a, stage, spec, str(i), t)
    if a.peer_heap:
        sides["TRL+heap"] = lambda i, t: other(a, stage, spec, f"{i}-heap", t, heap=True)
    sides["matmul"] = lambda i, t: other(a, "matmul", probe, f"{stage}-{i}", t)
    return sides


def probe_spec(a, shape: h.Shape, rows: int, head: bool, flops: float, drop_last: bool) -> dict:
    linears = shape.linears() if head else shape.linears()[:-1]
    return {"rows": rows, "dtype": a.dtype, "threads": a.threads, "flops": flops, "steps": a.steps,
            "drop_last": drop_last, "head": head, "linears": linears}


# ------------------------------------------------------------------------------------ report
def header(a) -> str:
    model = ("SmolLM2-135M-Instruct (134.5M params, 30 layers, hidden 576), LoRA as configs/smollm2.yaml"
             if a.model == "smollm2" else
             f"benchmark Llama ({h.n_params() / 1e6:.1f}M params), full fine-tuning")
    return (f"{h.machine()}; load average {h.load_avg()}; {model}; {a.dtype}, 1 rank x {a.threads} threads "
            f"unless named, our ZeRO-{a.zero}; {a.steps} steps ({a.warmup} warm-up); sides "
            f"{'one after the other' if a.sequential else 'taking turns step by step'}")


def peer_text(a, stage: str) -> str:
    trl = "TRL 0.11.4 PPOTrainer (transformers 4.46.3)" if stage == "ppo" else \
        f"TRL 1.16.0 {'SFTTrainer (packing wrapped)' if stage == 'sft' else 'RewardTrainer'}"
    return (f"peer: {trl}, model in {a.peer_base}, gradient checkpointing "
            f"{'on' if a.peer_checkpointing else 'off as ours'}"
            f"{'; TRL+heap = with our MALLOC_* settings' * a.peer_heap}")


def ceiling(a, shape: h.Shape, probe: dict, res: dict, per_unit: float, unit: str) -> float:
    """Print each side's median throughput as a share of the ceiling; return ours."""
    rate = h.median([x["rate"] for x in res["matmul"]])
    ceil = rate / per_unit
    sides = {k: h.median([x["rate"] for x in v]) for k, v in res.items() if k != "matmul"}
    burst = max(h.shape_rate(shape, probe["rows"], a.dtype, a.threads, probe["head"]) for _ in range(2))
    per_round = ", ".join(f"{x['rate'] / 1e9:.0f}" for x in res["matmul"])
    print(f"\n{a.dtype} matmul at the step's shapes ({probe['rows']} rows, {a.threads} threads), taking "
          f"turns with the steps: {rate / 1e9:.0f} GFLOP/s (rounds: {per_round}; best of short bursts now: "
          f"{burst / 1e9:.0f} at the step's shapes, {h.matmul_rate(a.dtype, threads=a.threads) / 1e9:.0f} at "
          f"2048^3); step {per_unit / 1e9:,.3g} GFLOP per {unit} -> ceiling {ceil:,.3g} {unit}s/s; "
          + ", ".join(f"{k} {v:,.3g} = {100 * v / ceil:.0f}%" for k, v in sides.items()))
    return sides["ours"] / ceil


def verdict(stage: str, res: dict, share: float | None) -> None:
    """Issue 16's targets against the medians; the last line is ``<stage>: ours/TRL = <ratio>``."""
    o, t = (h.median([x["rate"] for x in res[k]]) for k in ("ours", "TRL"))
    ratio, target = o / t, TARGETS[stage]
    rss = max(x["rss"] for x in res["ours"]) / max(x["rss"] for x in res["TRL"])
    lines = [f"speed-up {ratio:.2f}x (target >= {target}x: "
             f"{'met' if ratio >= target else f'missed by {100 * (1 - ratio / target):.0f}%'})",
             f"peak RSS {100 * rss:.0f}% of TRL's (target <= {100 * RSS_TARGET:.0f}%: "
             f"{'met' if rss <= RSS_TARGET else 'missed'})"]
    if share is not None:
        lines.append(f"{100 * share:.0f}% of the ceiling (target >= {100 * CEILING_TARGET:.0f}%: "
                     f"{'met' if share >= CEILING_TARGET else 'missed'})")
    info = res["TRL"][0]["info"]
    print(f"\npeer: {info['trainable']:,} trainable parameters, model {info['base_dtype']}"
          + (f", optimizer {info['optim']}, gradient checkpointing {info['gradient_checkpointing']}"
             if "optim" in info else ""))
    print(f"targets: {'; '.join(lines)}\n{loads()}")
    print(f"\n{stage}: ours/TRL = {ratio:.2f}")


def loads() -> str:
    return f"load average at each round's start: {'; '.join(h.LOADS)}; now {h.load_avg()}"


def show(r: dict) -> str:
    return f"{r['s']:.2f} s/step, {r['rss']:.0f} MB" if "s" in r else f"{r['rate'] / 1e9:.0f} GFLOP/s"


# ------------------------------------------------------------------------------------ stages
def stage_sft_rm(a, stage: str, shape: h.Shape) -> None:
    cfg = validated(a, stage)
    spec = peer_spec(a, stage, cfg)
    st = getattr(cfg, stage)
    n_lora, mb = shape.n_lora(st.lora), st.engine.micro_batch_size
    if stage == "sft":
        unit, seq = "token", st.seq_length
        per_unit, rows, head = shape.train(seq, seq, n_lora) / seq, mb * seq, True
        print(f"# SFT: {header(a)}; seq {seq}, micro batch {mb}, packing; {peer_text(a, stage)}")
    else:
        unit, lines = "pair", open(spec["data"]).readlines()
        timed = spec["order"][a.warmup * mb:(a.steps - 1) * mb]
        pairs = [json.loads(lines[i])["ids"] for i in timed]
        per_unit = sum(shape.train(len(c), 0, n_lora) + shape.train(len(r), 0, n_lora) for c, r in pairs)
        per_unit /= len(pairs)
        rows, head = int(mb * sum(len(c) + len(r) for c, r in pairs) / len(pairs)), False
        print(f"# RM: {header(a)}; {len(lines)} rm_train pairs within {st.max_length} tokens, micro batch "
              f"{mb} pairs, ours {'packed' if st.packed else 'padded'} (rm.packed), the peer fed our pairs "
              f"in our order; {peer_text(a, stage)}")
    probe = probe_spec(a, shape, rows, head, per_unit * (rows if stage == "sft" else mb), True)
    sides = {"ours": lambda i, t: ours(a, stage, str(i), t)}
    if stage == "rm" and a.rm_padded:
        sides["ours padded"] = lambda i, t: ours(a, stage, f"{i}-padded", t, packed=False)
    res = h.rounds(a.rounds, with_peers(a, stage, spec, sides, probe), show, together=not a.sequential)
    print(h.compare_table({k: v for k, v in res.items() if k != "matmul"}, "rate", f"{unit}s/s",
                          f"{stage.upper()} ({a.dtype})"))
    if stage == "rm":
        print(rm_tokens(pairs, mb))
    verdict(stage, res, ceiling(a, shape, probe, res, per_unit, unit))


def rm_tokens(pairs: list[list[list[int]]], mb: int) -> str:
    """Tokens per pair through the model: TRL's 2B rows padded to the micro batch's longest; the texts' own;
    ours (``rm.packed``): one row, each pair's shared question once, no padding."""
    from stackllama_ds.data.packed_pairs import common_prefix

    n = len(pairs) // mb * mb
    padded = sum(2 * mb * max(len(x) for p in pairs[s:s + mb] for x in p) for s in range(0, n, mb)) / n
    real = sum(len(c) + len(r) for c, r in pairs[:n]) / n
    packed = real - sum(common_prefix([c, r]) for c, r in pairs[:n]) / n
    return (f"\ntokens per pair (the timed steps): TRL {padded:.0f} (padded to the micro batch's longest; "
            f"{real:.0f} real), ours {packed:.0f} (question once, no padding): ours/TRL = "
            f"{packed / padded:.2f} ({padded - real:.0f} padding + {real - packed:.0f} repeated question "
            "tokens saved)")


def stage_ppo(a, shape: h.Shape) -> None:
    cfg = validated(a, "ppo")
    spec, p = peer_spec(a, "ppo", cfg), cfg.ppo
    lens = [len(x) for s in spec["steps"][a.warmup:] for x in s["prompt_ids"]]
    R, n_lora = a.response_len, shape.n_lora(p.lora)
    fl = {"generate": 0.0, "score": 0.0, "logprobs": 0.0, "train": 0.0}  # per step, over its rollouts
    for q in lens:
        n = q + R
        fl["generate"] += shape.fwd(n, R, n_lora)
        fl["score"] += shape.fwd(n, 0)  # question + response ~ n tokens, no LoRA
        fl["logprobs"] += shape.fwd(n, R, n_lora) + shape.fwd(n, R)  # actor and reference
        fl["train"] += p.ppo_epochs * shape.train(n, R, n_lora)
    fl = {k: v / (a.steps - a.warmup) for k, v in fl.items()}
    total = sum(fl.values())
    rows_train = int(p.mini_batch_size * (sum(lens) / len(lens) + R))
    ref = "adapter disabled" if p.lora.enabled else "a frozen copy"
    print(f"# PPO: {header(a)}; batch {p.batch_size}, mini batch {p.mini_batch_size}, {p.ppo_epochs} PPO "
          f"epochs, {R} new tokens, prompts <= {p.max_prompt_length} tokens (mean "
          f"{sum(lens) / len(lens):.0f} over the timed steps), reference = {ref}, reward = the model + a "
          f"fresh score head, KL early stopping off; {peer_text(a, 'ppo')}")
    probe = probe_spec(a, shape, rows_train, True, total, False)
    sides = with_peers(a, "ppo", spec, {"ours": lambda i, t: ours(a, "ppo", str(i), t)}, probe)
    res = h.rounds(a.rounds, sides, show, together=not a.sequential)
    rate = h.median([x["rate"] for x in res["matmul"]])
    peers = {k: v for k, v in res.items() if k != "matmul"}
    print(h.compare_table(peers, "s", "s/step", f"PPO step ({a.dtype})", higher_is_better=False))
    med = {k: {c: h.median([x[c] for x in v]) for c in v[0] if c not in ("info", "rss")}
           for k, v in peers.items()}
    o, nan = med["ours"], float("nan")
    fls = [fl["generate"], fl["score"], fl["logprobs"], fl["train"], fl["logprobs"] + fl["train"], total]
    split = [[f"{k} s", m["t_generate"], m["t_score"], m.get("t_logprobs", nan), m.get("t_train", nan),
              m["t_logprobs"] + m["t_train"] if k == "ours" else m["t_step"], m["s"]] for k, m in med.items()]
    split.append(["GFLOP", *(f / 1e9 for f in fls)])
    split += [[f"{k} GFLOP/s", *(f / x / 1e9 for f, x in zip(fls, row[1:]))] for k, row in zip(med, split)]
    split.append(["speed-up vs TRL", *(t / x for x, t in zip(split[0][1:], split[1][1:]))])
    print(h.table(["", "generate", "score", "log-probs", "train", "log-probs + train", "step"], split,
                  "step split, FLOPs and FLOP/s (median of rounds; TRL's step() holds its log-probs and "
                  "training; our generate is the step less the other phases)"))
    print(f"\n{a.dtype} matmul at the training shapes ({rows_train} rows), taking turns with the steps: "
          f"{rate / 1e9:.0f} GFLOP/s; the step's FLOPs over its time: "
          + ", ".join(f"{k} {100 * total / m['s'] / rate:.0f}%" for k, m in med.items())
          + f"; our training phase alone {100 * fl['train'] / o['t_train'] / rate:.0f}%")
    verdict("ppo", res, None)


def stage_scaling(a, which: str) -> None:
    """Ours on 1 rank x 1 core, 1 rank x every core and 2 ranks x cores/2; with --sequential also two lone
    1-rank runs at once (no communication: what two busy cores reach)."""
    cores = os.cpu_count() or 1
    per, zero = max(1, cores // 2), a.zero
    print(f"# {which.upper()} scaling, ours: {header(a)}; ZeRO-{zero} on every side; 1 rank has {per} or "
          f"{cores} cores, each of 2 ranks has {per} (OMP_NUM_THREADS); per rank as the config")

    def lone(i: int, turn: h.Turn) -> dict:
        def run(k: int) -> dict:
            turns.setup(h.OUT / f"turns-lone{k}")
            turn = {"folder": str(h.OUT / f"turns-lone{k}"), "index": 0, "n": 1}
            return ours(a, which, f"lone{k}-{i}", turn, 1, per, zero)

        with ThreadPoolExecutor(2) as ex:
            runs = list(ex.map(run, range(2)))
        return {"s": max(r["s"] for r in runs), "rate": sum(r["rate"] for r in runs),
                "rss": max(r["rss"] for r in runs)}

    sides = {f"1 rank x {per} core": lambda i, t: ours(a, which, f"s1c-{i}", t, 1, per, zero),
             f"1 rank x {cores} cores": lambda i, t: ours(a, which, f"s1-{i}", t, 1, None, zero),
             f"2 ranks x {per} core": lambda i, t: ours(a, which, f"s2-{i}", t, 2, None, zero)}
    if a.sequential:
        sides["2 lone ranks at once"] = lone
    res = h.rounds(a.rounds, sides, show, together=not a.sequential)
    unit, lone_col = "tok/s" if which == "sft" else "rollouts/s", len(res) > 3
    rows = h.per_round(res, lambda x: [*(s["rate"] for s in x), x[2]["rate"] / (2 * x[0]["rate"]),
                                       *([x[2]["rate"] / x[3]["rate"]] if lone_col else []),
                                       x[2]["rate"] / x[1]["rate"], x[2]["rss"]])
    print(h.table(["", *(f"{k} {unit}" for k in res), "efficiency (equal cores/rank)",
                   *(["efficiency vs lone ranks at once"] if lone_col else []),
                   "speed-up on the same machine", "2-rank peak RSS MB per rank"], rows,
                  f"{which.upper()} scaling ({a.dtype}, ZeRO-{zero})"))
    if which == "ppo":
        print(h.table(["", "generate s", "score s", "log-probs s", "train s", "step s"],
                      [[k, *(h.median([x[c] for x in s]) for c in (*PHASES, "s"))] for k, s in res.items()
                       if PHASES[0] in s[0]],  # the lone runs' phases are not summed
                      "time split per step (median of rounds; each rank its own batch)"))
    print(f"\n{loads()}")
    eff = rows[-1][len(res) + 1]  # the median row's efficiency: a ratio of medians
    print(f"\n{which}-scaling: 2 ranks / (2 x 1 rank), {per} core per rank = {eff:.2f}")


def stage_zero3_gen(a) -> None:
    """PPO on 2 ranks, actor (and critic) under ZeRO-3 with ``stage3_param_persistence_threshold: 0`` (really
    partitioned), batch 4 per rank, 1 epoch: generation tokens/s with the generation copy gathered once per
    rollout (``ppo.gather_generation``, the gather included) vs the partitioned actor."""
    z3 = {"zero_stage": 3, "stage3_param_persistence_threshold": 0}
    print(f"# ZeRO-3 generation: {header(a)}; 2 ranks, batch 4 per rank, 1 PPO epoch, {a.response_len} "
          "new tokens")

    def side(gather: bool):
        def run(i: int, t: h.Turn) -> dict:
            r = ours(a, "ppo", f"z3gen-{int(gather)}-{i}", t, 2, None, 3, actor=z3, critic=z3, batch_size=4,
                     ppo_epochs=1, gather_generation=gather)
            return {**r, "gen": 4 * 2 * a.response_len / r["t_generate"]}
        return run

    res = h.rounds(a.rounds, {"gather-once": side(True), "partitioned": side(False)}, show,
                   together=not a.sequential)
    rows = h.per_round(res, lambda x: [x[0]["gen"], x[1]["gen"], x[0]["gen"] / x[1]["gen"],
                                       x[0]["t_generate"], x[1]["t_generate"], x[0]["rss"], x[1]["rss"]])
    print(h.table(["", "gather-once tok/s", "partitioned tok/s", "speed-up", "gather t_generate s",
                   "partitioned t_generate s", "gather peak RSS MB/rank", "partitioned peak RSS MB/rank"],
                  rows, "ZeRO-3 generation (2 ranks)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", required=True,
                    choices=["sft", "rm", "ppo", "sft-scaling", "ppo-scaling", "zero3-gen"])
    ap.add_argument("--model", choices=["smollm2", "bench"], default="smollm2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, help="default: smollm2 5 (PPO 3); bench 12 (PPO 6, zero3-gen 3)")
    ap.add_argument("--warmup", type=int, help="default: 1; bench SFT and RM 2")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default: auto (bf16 where the CPU has it)")
    ap.add_argument("--zero", type=int, help="our ZeRO stage (default: 0 on 1 rank, 2 for scaling)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="of a 1-rank peer and of matmul")
    ap.add_argument("--micro-batch", type=int, help="SFT micro batch per rank (default: the config's)")
    ap.add_argument("--response-len", type=int, help="PPO (default: smollm2 36, the mean of 24-48; bench 32)")
    ap.add_argument("--rm-padded", action="store_true", help="RM: also our padded rows (rm.packed false)")
    ap.add_argument("--sequential", action="store_true", help="sides one after the other, not step by step")
    ap.add_argument("--peer-heap", action="store_true", help="also the peer with our launcher's MALLOC_*")
    ap.add_argument("--peer-base", choices=["bf16", "fp32"],
                    help="dtype the peer loads its model in (default: the run's with LoRA, fp32 without)")
    ap.add_argument("--peer-checkpointing", action="store_true", help="the peer with TRL 1.16's default "
                    "gradient checkpointing (the retired sft_bench.py/rm_bench.py ran it so)")
    a = ap.parse_args()
    bench, ppo = a.model == "bench", a.stage.startswith("ppo") or a.stage == "zero3-gen"
    short = a.stage == "zero3-gen" or ppo and not bench
    a.steps = a.steps or (3 if short else 6 if ppo else 12 if bench else 5)
    a.warmup = a.warmup if a.warmup is not None else 2 if bench and not ppo else 1
    a.response_len = a.response_len or (32 if bench else 36)
    if a.dtype is None:
        from stackllama_ds.hardware import auto_dtype

        a.dtype = auto_dtype()
    a.peer_base = a.peer_base or (a.dtype if not bench else "fp32")
    a.zero = a.zero if a.zero is not None else 2 if a.stage.endswith("-scaling") else 0
    folder = model_dir(a)
    data_dir(a)
    if a.stage.endswith("-scaling"):
        stage_scaling(a, a.stage.split("-")[0])
    elif a.stage == "zero3-gen":
        stage_zero3_gen(a)
    elif a.stage == "ppo":
        stage_ppo(a, h.Shape.of(folder))
    else:
        stage_sft_rm(a, a.stage, h.Shape.of(folder))


if __name__ == "__main__":
    main()
