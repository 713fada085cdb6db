"""DeepSpeed in one place: the only package that imports deepspeed or torch.distributed.

Submodules: ``dist`` (process group, rank helpers, reductions), ``ds_config`` (JSON from the
validated config), ``build`` (train/eval engines), ``generate`` (rollouts, ZeRO-3 gather-once),
``load`` (``zero3_init``: the models/ builders run partitioned; ``zero3_load`` reads the shards).
models/ builds modules without DeepSpeed and never imports this package. Import the submodules directly; this file stays light.
"""
