"""The safetensors reader behind partitioned ZeRO-3 loading: byte ranges equal safetensors' own
reading, and broken files fail naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from stackllama_ds.engines.zero3_load import CheckpointError, checkpoint_index, read_into, read_range


def test_ranges_match_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
               "b.bias": torch.randn(3, generator=g), "c": torch.arange(10, dtype=torch.int64)}
    save_file(tensors, tmp_path / "model.safetensors")
    index = checkpoint_index(tmp_path)
    ref = load_file(tmp_path / "model.safetensors")
    assert set(index) == set(ref)
    for name, t in ref.items():
        e = index[name]
        assert e.shape == tuple(t.shape) and e.dtype == t.dtype
        flat = t.reshape(-1)
        for start, count in [(0, flat.numel()), (1, 2), (flat.numel() - 1, 1), (flat.numel(), 0)]:
            assert torch.equal(read_range(e, start, count), flat[start:start + count])
            into = torch.full((count,), -1.0, dtype=torch.float64)  # another dtype: through a staging copy
            read_into(e, start, into)
            assert torch.equal(into, flat[start:start + count].double())


def test_sharded_folder_and_missing_shard_entry(tmp_path):
    save_file({"x": torch.ones(4)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"y": torch.zeros(2, 2)}, tmp_path / "model-00002-of-00002.safetensors")
    wm = {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    index = checkpoint_index(tmp_path)
    assert index["y"].shape == (2, 2) and index["x"].file.name == wm["x"]
    wm["z"] = wm["x"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="'z'"):
        checkpoint_index(tmp_path)


def test_no_safetensors_is_none(tmp_path):
    torch.save({"x": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert checkpoint_index(tmp_path) is None


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_truncated_file_names_the_file(tmp_path, cut):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(16, 16)}, f)
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint_index(tmp_path)


def _tiny_llama(cls, **kw):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    return cls(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, **kw))


def test_names_allow_a_missing_head_and_a_missing_prefix(tmp_path):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from stackllama_ds.engines.zero3_load import _checkpoint_names

    lm = _tiny_llama(LlamaForCausalLM)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, tmp_path / "model.safetensors")
    rm = _tiny_llama(LlamaForSequenceClassification, num_labels=1)
    names = _checkpoint_names(rm, checkpoint_index(tmp_path))
    assert names is not None and names["score.weight"] is None  # the head to initialise
    assert names["model.embed_tokens.weight"] == "model.embed_tokens.weight"
    # a bare LlamaModel checkpoint (no "model." prefix) read into the causal LM, lm_head absent
    save_file({k: v.contiguous() for k, v in lm.model.state_dict().items()}, tmp_path / "model.safetensors")
    names = _checkpoint_names(lm, checkpoint_index(tmp_path))
    assert names["model.layers.0.mlp.up_proj.weight"] == "layers.0.mlp.up_proj.weight"
    assert names["lm_head.weight"] is None


def test_names_refuse_a_missing_body_tensor_a_shape_or_half_a_head(tmp_path):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from stackllama_ds.engines.zero3_load import _checkpoint_names

    lm = _tiny_llama(LlamaForCausalLM)
    sd = {k: v.contiguous() for k, v in lm.state_dict().items()}
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, tmp_path / "model.safetensors")
    assert _checkpoint_names(lm, checkpoint_index(tmp_path)) is None
    save_file({**sd, "lm_head.weight": sd["lm_head.weight"][:-1]}, tmp_path / "model.safetensors")
    assert _checkpoint_names(lm, checkpoint_index(tmp_path)) is None
    rm = _tiny_llama(LlamaForSequenceClassification, num_labels=1)
    rm.score = torch.nn.Linear(16, 1, bias=True)  # bias saved, weight not: initialising the module would undo the read
    save_file({**sd, "score.bias": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert _checkpoint_names(rm, checkpoint_index(tmp_path)) is None
