"""stackllama-ds: the StackLLaMA recipe (SFT -> reward model -> PPO) on DeepSpeed ZeRO."""

__version__ = "0.1.0"
