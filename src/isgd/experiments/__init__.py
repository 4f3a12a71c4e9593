"""Experiments over runs: ``isgd compare`` (arms × seeds, paired statistics) and
``isgd batch-study``."""
