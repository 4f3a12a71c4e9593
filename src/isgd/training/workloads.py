"""Built-in workloads beyond the image presets, named like a user's: ``--preset
charlm-shakespeare`` trains ``isgd.training.workloads:charlm_shakespeare``.

:func:`charlm_shakespeare` is a character-level language model of Shakespeare's works: the 42
works of :mod:`isgd.data.shakespeare` split into contiguous blocks of every work (95 % training,
2.5 % validation, 2.5 % test), :class:`~isgd.models.CharGPT` (≈ 1M parameters, context 128) over
the 128 ASCII codes (the texts are ASCII: a fixed vocabulary needs no table, and a model that
knows nothing scores log2 128 = 7 bits per character), the mean cross-entropy over every
predicted character as the loss, and the loss in bits per character as the metric (lower is
better). :func:`text_workload` builds the same from any texts (the tests' tiny excerpt).

A sample is a window of ``context`` characters and, as its target, the same window shifted by
one character (:class:`TextWindows`). The windows do not overlap and never cross the end of a
block, so an epoch reads the training text once (less the last few characters of each block that
make no whole window). The training set is the
training windows followed by the validation windows; the preset holds out exactly those
(``validation`` = their number, checked), so that evaluations during a run read the validation
text and the test text is read once, at the end.

The data directory is ``$ISGD_DATA_DIR`` or ``~/.cache/isgd/data`` (a workload function takes
only the seed); ``--data-dir DIR`` on the command line sets ``ISGD_DATA_DIR`` for the command.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from isgd.data.shakespeare import SPLIT, read_works, split_works
from isgd.data.sources import resolve_data_dir
from isgd.errors import DataError
from isgd.models import CharGPT
from isgd.training.config import PRESETS
from isgd.training.workload import Metric, Workload

__all__ = [
    "BITS_PER_CHAR",
    "CONTEXT",
    "VOCAB",
    "TextWindows",
    "bits_per_char",
    "charlm_shakespeare",
    "lm_loss",
    "text_workload",
]

CONTEXT = 128  # characters a window holds (the model's context)
VOCAB = 128  # the ASCII codes


class TextWindows(Dataset[tuple[Tensor, Tensor]]):
    """The windows of ``context`` characters of each block of text at stride ``context``, each
    with its target, the window shifted by one character (inputs and targets ``int64``, a batch
    at once by :meth:`gather`). ``validation_windows``: how many windows, at the end, come from
    the ``validation`` blocks appended after ``blocks``."""

    def __init__(self, blocks: Sequence[str], context: int, validation: Sequence[str] = ()) -> None:
        parts, starts, offset = [], [], 0
        for i, block in enumerate([*blocks, *validation]):
            try:
                data = block.encode("ascii")
            except UnicodeEncodeError as e:
                raise DataError(f"block {i} of the text is not ASCII at offset {e.start}") from None
            n = max(0, (len(data) - 1) // context)  # each window needs the character after it
            starts.append(offset + context * torch.arange(n))
            parts.append(data)
            offset += len(data)
        self.tokens = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
        self.starts = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)
        self.span = torch.arange(context + 1)
        self.validation_windows = sum(len(s) for s in starts[len(blocks) :])

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.gather(torch.tensor([i]))
        return x[0], y[0]

    def gather(self, index: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        chunks = self.tokens[self.starts[torch.as_tensor(index)][:, None] + self.span].long()
        return chunks[:, :-1], chunks[:, 1:]


def lm_loss(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean cross-entropy (nats) over every position: ``output`` B×T×V logits, ``target``
    B×T; ``reduction="none"``: per sequence, the mean over its positions (B values, for
    selective backprop's per-example losses)."""
    if reduction == "none":
        return F.cross_entropy(output.transpose(1, 2), target, reduction="none").mean(1)
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def bits_per_char(output: Tensor, target: Tensor) -> Tensor:
    """:func:`lm_loss` in bits: the mean cross-entropy / ln 2."""
    return lm_loss(output, target) / math.log(2)


BITS_PER_CHAR = Metric("bits_per_char", bits_per_char, higher_is_better=False)


def text_workload(
    works: Sequence[str],
    *,
    context: int = CONTEXT,
    split: tuple[float, float] = SPLIT,
    name: str = "",
    **size: Any,
) -> Workload:
    """The character language model of ``works`` (split by :func:`isgd.data.shakespeare
    .split_works`): a fresh :class:`~isgd.models.CharGPT` of ``context`` and ``size``
    (``layers``, ``width``, ``heads``; its defaults ≈ 1M parameters), trained on the training
    windows followed by the validation windows (``workload.train.validation_windows``), tested
    on the test windows, judged in bits per character."""
    blocks = split_works(works, split)
    return Workload(
        model=CharGPT(VOCAB, context, **size),
        train=TextWindows(blocks.train, context, blocks.validation),
        test=TextWindows(blocks.test, context),
        loss=lm_loss,
        metric=BITS_PER_CHAR,
        name=name,
    )


def charlm_shakespeare(seed: int) -> Workload:
    """Shakespeare's works (``isgd data fetch shakespeare``), a CharGPT of ≈ 1M parameters
    initialised from the seed set before this call; the same text for every seed."""
    del seed  # the model's initialisation follows torch's seed, which the caller set
    workload = text_workload(read_works(resolve_data_dir(None) / "shakespeare"), name="shakespeare")
    held_out = PRESETS["charlm-shakespeare"]["validation"]
    found = workload.train.validation_windows  # type: ignore[attr-defined]
    if found != held_out:  # the split or the context changed, not the (pinned) data
        raise DataError(
            f"the Shakespeare validation text makes {found} windows, but the preset "
            f"charlm-shakespeare holds out {held_out}; set its validation to {found}"
        )
    return workload
