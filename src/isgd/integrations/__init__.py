"""ISGD in trainer frameworks: one module per framework, imported only on use.

- :mod:`isgd.integrations.lightning` — ``ISGDCallback`` for Lightning's automatic optimisation.
- :mod:`isgd.integrations.huggingface` — ``ISGDTrainer``, a Hugging Face ``Trainer``.
- Accelerate needs no adapter: ``examples/accelerate_loop.py`` is the loop.

Each needs its framework installed (``pip install 'isgd[integrations]'``); ``import isgd`` never
imports one. What each framework does to the closure, and why these are shaped as they are:
``docs/integrations.md``.
"""
