"""A workload: the model, the data, the loss and the metric a run trains and judges.

``isgd train`` and ``isgd compare`` train a :class:`Workload`. The built-in presets build one from
the configuration's data keys (:func:`isgd.training.data_setup.image_workload`); a user's comes
from ``--workload FILE.py:FUNC`` (or ``package.module:FUNC``), where ``FUNC(seed)`` returns it::

    from isgd.experiments import Metric, Workload

    def workload(seed: int) -> Workload:
        return Workload(model=MyNet(), train=train_set, test=test_set,
                        loss=F.mse_loss, metric=Metric("mse", F.mse_loss, higher_is_better=False))

``train`` and ``test`` are map-style data sets of ``(input, target)`` pairs; a
:class:`~torch.utils.data.TensorDataset` of two tensors is read by indexing its tensors (the
fast path), any other through ``default_collate`` of its items. ``loss(output, target)`` is the
batch's mean training loss; ``metric`` is ``"accuracy"`` (the default: ``output`` holds N×K
class scores, ``target`` N labels), ``"loss"`` (the loss on the test split, lower is better) or
a :class:`Metric`. The seed is set (``torch.manual_seed(seed)``) before ``FUNC(seed)`` runs, so
that a model built inside it starts the same for every arm of a seed.

:func:`load_workload` turns every way a workload file can be broken into one
:class:`WorkloadError` line (exit code 2) naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset, default_collate

from isgd.errors import ConfigError, IsgdError

__all__ = [
    "ACCURACY",
    "PERCENT_METRICS",
    "Loss",
    "Metric",
    "Workload",
    "WorkloadError",
    "check_workload",
    "collate",
    "format_metric",
    "iter_batches",
    "load_workload",
    "resolve_spec",
    "spec_digest",
]

Loss = Callable[[Tensor, Tensor], Tensor]  # (output, target) -> the batch's mean loss


class WorkloadError(ConfigError):
    """A workload that cannot be loaded or does not fit together (one line, exit code 2)."""


@dataclass(frozen=True)
class Metric:
    """How a run is judged on the test split: ``fn(output, target)`` is a batch's mean (a
    tensor or a float); the split's value is the mean over its samples, the batch means weighted
    by their sizes — so a metric must be a mean over examples (accuracy, a mean loss, bits per
    character). ``higher_is_better`` states its direction: a target is reached when the metric
    is at or above it (higher) or at or below it (lower)."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor | float]
    higher_is_better: bool

    def reached(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target

    def better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.higher_is_better else value < than)

    def format(self, value: float) -> str:
        return format_metric(self.name, value)


#: metrics that are fractions in [0, 1], printed as percentages (others as plain numbers)
PERCENT_METRICS = frozenset({"accuracy", "balanced_accuracy"})


def format_metric(name: str, value: float) -> str:
    """``accuracy 98.12%`` for a fraction (:data:`PERCENT_METRICS`), ``mse 0.0231`` otherwise."""
    if name in PERCENT_METRICS:
        return f"{name} {100 * value:.2f}%"
    return f"{name} {value:.4g}"


def _accuracy(output: Tensor, target: Tensor) -> Tensor:
    return (output.argmax(1) == target).double().mean()


ACCURACY = Metric("accuracy", _accuracy, higher_is_better=True)


@dataclass
class Workload:
    """What to train: ``model`` on ``train``, judged on ``test`` by ``metric``; see the module
    docstring. ``name`` is what logs and results call it (default: the workload's spec);
    ``num_classes`` sizes accuracy's per-class counts (default: the model's output width)."""

    model: nn.Module
    train: Dataset[Any]
    test: Dataset[Any]
    loss: Loss = F.cross_entropy
    metric: str | Metric = "accuracy"
    name: str = ""
    num_classes: int | None = None

    @property
    def judged_by(self) -> Metric:
        """``metric`` as a :class:`Metric` (``"loss"`` is the loss on the test split)."""
        if isinstance(self.metric, Metric):
            return self.metric
        if self.metric == "loss":
            return Metric("loss", self.loss, higher_is_better=False)
        return ACCURACY

    @property
    def is_classification(self) -> bool:
        """Judged by accuracy: the evaluation also counts per-class hits (balanced accuracy)."""
        return self.judged_by is ACCURACY

    def split_validation(self, n_val: int) -> tuple[Workload, Dataset[Any]]:
        """(this workload training on all but the last ``n_val`` training samples, those
        samples): a validation split carved from the training data."""
        n = len(self.train)  # type: ignore[arg-type]
        train = Subset(self.train, range(n - n_val))
        return replace(self, train=train), Subset(self.train, range(n - n_val, n))

    def hold_out(self, n_val: int) -> Workload:
        """The last ``n_val`` training samples as the test split, the rest as training (for
        tuning: the real test split stays untouched)."""
        rest, held_out = self.split_validation(n_val)
        return replace(rest, test=held_out, name=f"{self.name}[tune]")


def collate(dataset: Dataset[Any], index: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
    """The batch ``(inputs, targets)`` of ``dataset`` at ``index``: by its own ``gather(index)``
    where it has one (the built-in image data: a batch prepared at once), by indexing the two
    tensors of a TensorDataset, else by ``default_collate`` of its items."""
    if isinstance(dataset, Subset) and isinstance(dataset.indices, range):  # a split's part
        first = dataset.indices.start
        if isinstance(index, range):
            return collate(dataset.dataset, range(first + index.start, first + index.stop))
        return collate(dataset.dataset, torch.as_tensor(index) + first)
    gather = getattr(dataset, "gather", None)
    if gather is not None:
        return gather(index)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
        return x[index], y[index]
    rows = index.tolist() if isinstance(index, Tensor) else list(index)
    x, y = default_collate([dataset[i] for i in rows])
    return x, y


# ---------------------------------------------------------------------- loading a spec
def resolve_spec(spec: str) -> str:
    """``FILE.py:FUNC`` with the file made absolute (resumes and comparisons run it from
    elsewhere); ``package.module:FUNC`` as it is."""
    target, func = _split(spec)
    if _is_file(target):
        return f"{Path(target).expanduser().resolve()}:{func}"
    return spec


def spec_digest(spec: str) -> str | None:
    """SHA-256 of a ``FILE.py`` workload's file (provenance), ``None`` for a module."""
    target, _ = _split(spec)
    if not _is_file(target):
        return None
    try:
        return hashlib.sha256(Path(target).expanduser().read_bytes()).hexdigest()
    except OSError:
        return None


def _split(spec: str) -> tuple[str, str]:
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func.isidentifier():
        raise WorkloadError(
            f"invalid workload {spec!r}: expected FILE.py:FUNC or package.module:FUNC"
        )
    return target, func


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def load_workload(spec: str, seed: int) -> Workload:
    """``FUNC(seed)`` of ``spec``, checked (:func:`check_workload`); every failure is one
    :class:`WorkloadError` naming the spec."""
    target, func_name = _split(spec)
    module = _import(spec, target)
    func = getattr(module, func_name, None)
    if func is None:
        defined = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        raise WorkloadError(
            f"workload {spec}: {target} has no function {func_name!r}"
            + (f" (it defines: {', '.join(defined[:8])})" if defined else "")
        )
    if not callable(func):
        raise WorkloadError(
            f"workload {spec}: {func_name} is a {type(func).__name__}, not a function"
        )
    torch.manual_seed(seed)
    try:
        workload = func(seed)
    except IsgdError:  # isgd's own one-line errors (a data set to fetch) say what to do already
        raise
    except Exception as err:  # the user's code: any exception is the workload's fault
        raise WorkloadError(
            f"workload {spec}: {func_name}(seed={seed}) raised {_one_line(err)}{_where(err)}"
        ) from None
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"workload {spec}: {func_name}(seed) returned {type(workload).__name__}, not "
            "isgd.experiments.Workload(model=..., train=..., test=...)"
        )
    if not workload.name:
        workload.name = f"{Path(target).stem if _is_file(target) else target}:{func_name}"
    return check_workload(workload, f"workload {spec}")


def _import(spec: str, target: str) -> Any:
    if not _is_file(target):
        try:
            return importlib.import_module(target)
        except ModuleNotFoundError as err:
            if err.name and target.startswith(err.name):
                raise WorkloadError(
                    f"workload {spec}: no module named {err.name!r} (a file needs its .py suffix "
                    "or a path: ./file.py:FUNC)"
                ) from None
            raise WorkloadError(f"workload {spec}: importing it raised {_one_line(err)}") from None
        except Exception as err:
            raise WorkloadError(
                f"workload {spec}: importing it raised {_one_line(err)}{_where(err)}"
            ) from None
    path = Path(target).expanduser()
    if not path.is_file():
        raise WorkloadError(f"workload {spec}: no such file {path}")
    name = "isgd_workload_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:  # loaded before in this process (another seed, another arm)
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise WorkloadError(f"workload {spec}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        del sys.modules[name]
        raise WorkloadError(
            f"workload {spec}: {path}:{err.lineno}: syntax error: {err.msg}"
        ) from None
    except Exception as err:
        del sys.modules[name]
        raise WorkloadError(
            f"workload {spec}: importing {path} raised {_one_line(err)}{_where(err)}"
        ) from None
    return module


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _where(err: BaseException) -> str:
    """`` (at FILE:LINE)``: the innermost frame outside torch and isgd, where the user's code
    went wrong."""
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if "site-packages" not in f.filename and "/isgd/" not in f.filename
    ]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


# ---------------------------------------------------------------------- checks
PROBE_SAMPLES = 2  # samples in the probe batch that checks model, loss and metric fit
LABEL_SCAN = 4096  # training targets read to find the classes of a data set that is not tensors


def check_workload(workload: Workload, where: str) -> Workload:
    """``workload`` if its parts fit together, else one :class:`WorkloadError` line: the types,
    non-empty map-style data sets of ``(input, target)``, a model whose output fits the loss and
    the metric (one forward of two training samples, in eval mode, without gradients, the RNG
    and the model's state left as they were), and for accuracy at least two classes among the
    training labels, all within the model's output width."""
    if not isinstance(workload.model, nn.Module):
        raise WorkloadError(
            f"{where}: model is a {type(workload.model).__name__}, not an nn.Module"
        )
    for split in ("train", "test"):
        _check_dataset(getattr(workload, split), split, where)
    if not callable(workload.loss):
        raise WorkloadError(f"{where}: loss is a {type(workload.loss).__name__}, not a function")
    if not isinstance(workload.metric, Metric) and workload.metric not in ("accuracy", "loss"):
        raise WorkloadError(
            f"{where}: metric {workload.metric!r} is not 'accuracy', 'loss' or an "
            "isgd.experiments.Metric(name, fn, higher_is_better)"
        )
    output, target = _probe(workload, where)
    if workload.is_classification:
        workload.num_classes = _check_classes(workload, output, target, where)
    return workload


def _check_dataset(dataset: Any, split: str, where: str) -> None:
    if isinstance(dataset, IterableDataset) or not (
        hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    ):
        raise WorkloadError(
            f"{where}: {split} is a {type(dataset).__name__}, not a map-style Dataset (with "
            "__len__ and __getitem__); e.g. torch.utils.data.TensorDataset(inputs, targets)"
        )
    if len(dataset) == 0:
        raise WorkloadError(f"{where}: the {split} data set is empty")
    try:
        item = dataset[0]
    except Exception as err:
        raise WorkloadError(f"{where}: {split}[0] raised {_one_line(err)}{_where(err)}") from None
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise WorkloadError(
            f"{where}: {split}[0] is a {type(item).__name__}"
            + (f" of {len(item)}" if isinstance(item, tuple | list) else "")
            + ", not an (input, target) pair"
        )


def _probe(workload: Workload, where: str) -> tuple[Tensor, Tensor]:
    model = workload.model
    x, y = collate(workload.train, range(min(PROBE_SAMPLES, len(workload.train))))  # type: ignore[arg-type]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            try:
                output = model(x.to(device))
            except Exception as err:
                raise WorkloadError(
                    f"{where}: the model cannot take a batch of train inputs (shape "
                    f"{_shape(x)}): {_one_line(err)}{_where(err)}"
                ) from None
            y = y.to(device) if isinstance(y, Tensor) else y
            _check_scalar(workload.loss, output, y, "loss", where)
            if not workload.is_classification:
                _check_scalar(
                    workload.judged_by.fn, output, y, f"metric {workload.judged_by.name}", where
                )
    finally:
        model.train(was_training)
    return output, y


def _check_scalar(fn: Callable[..., Any], output: Any, target: Any, what: str, where: str) -> None:
    shapes = f"output {_shape(output)}, target {_shape(target)}"
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            value = fn(output, target)
    except Exception as err:
        raise WorkloadError(
            f"{where}: the model's output does not fit the {what} ({shapes}): "
            f"{_one_line(err)}{_where(err)}"
        ) from None
    if warned:  # e.g. mse_loss broadcasting N×1 outputs against N targets to N×N
        message = _one_line(warned[0].message)  # type: ignore[arg-type]
        raise WorkloadError(f"{where}: the {what} warns ({shapes}): {message}")
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if not isinstance(value, float | int) or isinstance(value, bool):
        raise WorkloadError(
            f"{where}: the {what} gives {_shape(value)}, not one number ({shapes}); "
            "reduce it to the batch mean"
        )


def _shape(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} {tuple(value.shape)}".replace("torch.", "")
    return type(value).__name__


def _check_classes(workload: Workload, output: Tensor, target: Tensor, where: str) -> int:
    """The number of classes accuracy counts, after checking output and labels fit it."""
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise WorkloadError(
            f"{where}: metric 'accuracy' needs N×K class scores, but the model gives "
            f"{_shape(output)}; give metric='loss' or an isgd.experiments.Metric"
        )
    k = workload.num_classes or int(output.shape[1])
    labels = _labels(workload.train)
    if labels.is_floating_point() or labels.dim() != 1:
        raise WorkloadError(
            f"{where}: metric 'accuracy' needs integer class labels, but the train targets are "
            f"{_shape(labels)}; give metric='loss' or an isgd.experiments.Metric"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= k:
        raise WorkloadError(
            f"{where}: train labels {low}..{high} lie outside the model's {k} classes"
        )
    if len(labels.unique()) < 2:
        raise WorkloadError(
            f"{where}: every train label is {low}: one class leaves nothing to learn"
            + (f" (read the first {LABEL_SCAN} samples)" if len(labels) == LABEL_SCAN else "")
        )
    return k


def _labels(dataset: Dataset[Any]) -> Tensor:
    """The training targets: all of a TensorDataset's, else those of the first samples."""
    n = len(dataset)  # type: ignore[arg-type]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[1]
    return torch.as_tensor(collate(dataset, range(min(n, LABEL_SCAN)))[1])


def iter_batches(
    dataset: Dataset[Any], lo: int, hi: int, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """The samples ``lo..hi-1`` of ``dataset`` in consecutive batches."""
    for start in range(lo, hi, batch_size):
        yield collate(dataset, range(start, min(start + batch_size, hi)))
