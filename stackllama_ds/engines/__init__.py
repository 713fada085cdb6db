"""DeepSpeed in one place: the only package that imports deepspeed or torch.distributed.

Submodules: ``dist`` (process group, rank helpers, reductions), ``ds_config`` (JSON from the
validated config), ``build`` (train/eval engines), ``generate`` (rollouts, ZeRO-3 gather-once).
Import the submodules directly; this file stays light.
"""
