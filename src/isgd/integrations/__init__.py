"""ISGD in trainer frameworks: one module per framework, imported only on use.

- :mod:`isgd.integrations.lightning` — ``ISGDCallback`` (and ``ISGDMixedPrecision`` for
  ``16-mixed``).
- :mod:`isgd.integrations.huggingface` — ``ISGDTrainer``, a Hugging Face ``Trainer``.
- :mod:`isgd.integrations.accelerate` — ``prepare``, ``accelerator.prepare`` for ISGD (fp16's
  scaler handed to ISGD, ``accelerator.accumulate`` refused); ``examples/accelerate_loop.py``.

Each needs its framework installed (``pip install 'isgd[integrations]'``); ``import isgd`` never
imports one. What each framework does to the closure, and why these are shaped as they are:
``docs/integrations.md``.
"""
