"""atoll.checkpoint: asynchronous universal checkpoints (snapshots, commit, retention, interop)."""
