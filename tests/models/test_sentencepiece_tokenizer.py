"""A LLaMA folder that ships only ``tokenizer.model`` (no tokenizer.json) loads: transformers converts
the SentencePiece model, which needs the sentencepiece and protobuf dependencies.

    python -m pytest tests/models/test_sentencepiece_tokenizer.py -q
"""

from __future__ import annotations

import json

from stackllama_ds.models.load import load_tokenizer


def test_tokenizer_model_only_folder_loads(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Question: why is beer {i} bitter?\n\nAnswer: hops, {i * 7} of them" for i in range(200)))
    folder = tmp_path / "llama"
    folder.mkdir()
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=100,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]

    tok = load_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    text = "why is beer bitter?"
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2  # LLaMA has no pad token: EOS, as StackLLaMA
