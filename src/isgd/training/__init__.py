"""Training runs: configuration, the trainer and its run directory, data-parallel runtime
and launch."""
