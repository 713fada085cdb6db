"""Model loading, heads, export and the tiny-model kit (transformers, peft, bitsandbytes)."""
