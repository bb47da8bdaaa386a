"""What a run leaves on disk: its workdir (``workdirs``: the lock, the history, writable
paths), its Orbax checkpoints (``checkpointing``) and a checkpoint read back with its own
config (``saved_run``), so eval, export and predict need no flags and no training data."""
