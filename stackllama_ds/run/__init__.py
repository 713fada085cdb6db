"""A stage running on a rank: its layout, entry and exit codes, signals, checkpoints, heartbeat, metrics, test hooks."""
