"""What a run reports: TensorBoard and ``metrics.jsonl`` (``metric_writers``), the
progress bar (``progress``), the console and log file (``logs``), traces and wall time by
part (``profiling``) and the training curves (``plot``)."""
