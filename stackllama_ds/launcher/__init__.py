"""Starting ranks: the local supervisor (``spawn``) and cluster helpers (``slurm``)."""
