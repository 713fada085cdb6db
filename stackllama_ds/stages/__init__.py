"""One training loop per stage: sft, rm, ppo, eval. Stages never import each other."""
