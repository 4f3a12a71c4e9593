"""Training configuration: defaults ← preset ← TOML file ← command-line overrides.

Every key is a field of :class:`TrainConfig`; unknown keys and wrong types are rejected by name
(:class:`ConfigError`, one line, which the CLI turns into exit code 2). A checkpoint resumes
only under the keys it was written with that are structural (:func:`check_checkpoint_config`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from isgd.data import registry as datasets
from isgd.errors import ConfigError, RunError
from isgd.optim import INNER_SOLVERS
from isgd.spc import MAX_WINDOW

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "LR_POLICIES",
    "MAX_ITERS",
    "MAX_SEED",
    "MAX_WINDOW",
    "OPTIMIZERS",
    "PRESETS",
    "ConfigError",
    "TrainConfig",
    "check_checkpoint_config",
    "lr_factor",
    "resolve_config",
]

OPTIMIZERS = (  # BASE, or METHOD-BASE (the method alone: over sgd); isgd.training.relatives
    *("sgd", "isgd", "nesterov", "isgd-nesterov", "adam", "isgd-adam", "adamw", "isgd-adamw"),
    *("skipstep", "skipstep-nesterov", "skipstep-adam", "skipstep-adamw", "selective-backprop"),
    *("selective-backprop-nesterov", "selective-backprop-adam", "selective-backprop-adamw"),
)
LR_POLICIES = ("fixed", "step", "multistep", "inv", "cosine")
# upper bounds of the counts (documented in README "Configuration"): far beyond any real run, and
# small enough that every count, and every seed derived from ``seed`` (seed·1_000_003 + stream, the
# reshuffling and data-variant streams), fits the 64-bit integers torch takes
MAX_ITERS = 10**12  # iterations (or epochs × batches per epoch), milestones, step_size, ...
MAX_BUDGET = 100.0  # a budget above 1 stretches the run (an equal-compute control)
MAX_SEED = 2**32  # seeds are 0 <= seed < 2**32


# configuration keys a checkpoint cannot be resumed under once changed
STRUCTURAL_KEYS = (
    "workload",
    "model",
    "dataset",
    "optimizer",
    "batch_size",
    "crop_size",
    "window",
)


# on_nonfinite, the command line's word for what a NaN/inf batch loss does, → the library's
# ISGD(nonfinite=...): the one policy, named for users as "stop the run" or "skip the batch"
NONFINITE_POLICY = {"stop": "raise", "skip": "skip"}


@dataclasses.dataclass
class TrainConfig:
    """One training run. Field names are the TOML keys and, with ``-`` for ``_``, the flags."""

    # what to train: a workload (FILE.py:FUNC or package.module:FUNC returning a Workload), or
    # the built-in image workload of the data keys (dataset, model, normalize, ... below)
    workload: str = ""
    dataset: str = "mnist"
    model: str = "lenet"
    optimizer: str = "isgd"
    # solver
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_policy: str = "inv"
    gamma: float = 1e-4  # inv: lr·(1 + gamma·t)^−power; step/multistep: factor per drop
    power: float = 0.75
    step_size: int = 10_000  # step policy: iterations between drops
    milestones: list[int] = dataclasses.field(default_factory=list)  # multistep policy
    warmup: int = 0  # iterations of linear warm-up of the learning rate (under any policy)
    # ISGD (ignored by sgd / nesterov / adam)
    sigma_factor: float = 3.0
    max_extra_iters: int = 5
    eps: float = 0.1
    inner_solver: str = "base"  # extra iterations: base optimizer's step | gd | momentum (fresh)
    freeze_bn_stats: bool = True
    window: int = 0  # control chart window in batches; 0: one epoch, n_b (the paper)
    # variant, not the paper's method: a batch whose loss is below this quantile of the window
    # gets its forward pass only (no backward, no update); 0: off
    lower_quantile: float = 0.0
    # ISGD's relatives, arms of isgd compare (isgd.training.relatives; ignored by other arms):
    # skipstep: no update when the loss (and with skip_grad_norm the gradient norm) is above
    # mean + skip_sigma_factor·σ of the last skip_window steps (OLMo-core's SkipStepOptimizer)
    skip_sigma_factor: float = 6.0
    skip_window: int = 128
    skip_grad_norm: bool = False
    # selective-backprop: back-propagate the fraction keep of a batch, drawn by loss percentile,
    # from keep_start to keep_end of the run, every batch but each keep_interrupt-th (Composer's)
    keep: float = 0.5
    keep_start: float = 0.5
    keep_end: float = 0.9
    keep_interrupt: int = 2  # 0: every batch in [keep_start, keep_end)
    # random controls (0: off): this fraction of the steps forward-only, drawn at random; this
    # fraction of a batch kept at random, on the selective-backprop schedule (keep_*)
    random_skip_steps: float = 0.0
    random_keep: float = 0.0
    # data
    normalize: str = "scale"  # scale (Caffe LeNet, x/256) | standardize | mean_subtract
    augment: bool = False  # random crop (padding 4, or crop_size) and horizontal flip
    crop_size: int = 0  # > 0: train on crop_size² crops (random with augment), test on the centre
    reshuffle: bool = False  # per-epoch reshuffling instead of the fixed cycle (ablation)
    # harder data (isgd.data.variants), seeded by `seed`; the test split stays untouched
    imbalance: float = 1.0  # long tail: n_max/n_min of an exponential profile; 1: as it is
    label_noise: float = 0.0  # fraction of training labels flipped to another class
    class_weights: str = "none"  # none | balanced (w_c = N/(K·n_c), the remedy for imbalance)
    # budget and bookkeeping
    iters: int = 10_000
    epochs: float = 0.0  # when > 0, overrides iters: epochs × batches per epoch
    # a fraction of that run: its length and its learning-rate schedule compressed to it, fully
    # decayed (lr_factor); 1: the run as configured
    budget: float = 1.0
    eval_every: int = 500
    # > 0: the last this many training samples are held out as a validation split, which the
    # evaluations during the run read (and targets); the test split is read once, at the end
    validation: int = 0
    eval_batch_size: int = 1000
    checkpoint_every: int = 2000
    log_every: int = 100  # plain progress lines when the output is not a terminal
    seed: int = 0
    threads: int = 2  # torch CPU threads (per process under torchrun / --nproc)
    device: str = "cpu"  # cpu | cuda (under torchrun: GPU LOCAL_RANK, NCCL)
    channels_last: bool = True
    step_records: bool = True  # write steps.jsonl
    tensorboard: bool = True
    # when > 0, summary.json reports time/passes to reach this value of the workload's metric
    # (accuracy: a fraction; reached at or above it, or at or below it when lower is better)
    target: float = 0.0
    on_nonfinite: str = "stop"  # a NaN/inf batch loss: "stop" the run, or "skip" the batch
    preset: str = ""  # the preset the run started from (informational)

    @property
    def uses_isgd(self) -> bool:
        return self.optimizer.startswith("isgd")

    @property
    def nonfinite(self) -> str:
        """``on_nonfinite`` in the library's words, ``ISGD(nonfinite=...)``: ``stop`` is
        ``"raise"`` (the run then stops with NonFiniteError), ``skip`` is ``"skip"``."""
        return NONFINITE_POLICY[self.on_nonfinite]

    def validate(self) -> TrainConfig:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"invalid {key}: {getattr(self, key)!r} ({what})")

        from isgd.models import MODELS

        need(self.optimizer in OPTIMIZERS, "optimizer", "one of " + ", ".join(OPTIMIZERS))
        if self.workload:
            image_keys = [k for k in IMAGE_KEYS if getattr(self, k) != getattr(DEFAULTS, k)]
            need(
                not image_keys,
                "workload",
                f"a workload brings its own model and data: drop {', '.join(image_keys)} "
                "(they shape the built-in image data sets)",
            )
        need(self.model in MODELS, "model", "one of " + ", ".join(MODELS))
        need(datasets.is_known(self.dataset), "dataset", "one of " + datasets.describe())
        need(self.lr_policy in LR_POLICIES, "lr_policy", "one of " + ", ".join(LR_POLICIES))
        need(
            self.normalize in ("scale", "standardize", "mean_subtract"),
            "normalize",
            "one of scale, standardize, mean_subtract",
        )
        for key in ("batch_size", "eval_every", "eval_batch_size", "checkpoint_every", "threads"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.validation >= 0, "validation", "samples held out, >= 0 (0: none)")
        cpus = available_cpus()
        need(
            self.threads <= cpus,
            "threads",
            f"this machine gives this process {cpus} CPU(s); more threads than that only slow "
            "it down",
        )
        need(self.crop_size >= 0, "crop_size", "must be >= 0 (0: no crop)")
        need(1 <= self.iters <= MAX_ITERS, "iters", "must be >= 1 and <= 10**12")
        need(0 <= self.seed < MAX_SEED, "seed", "must be an integer with 0 <= seed < 2**32")
        for key in (k for k, hint in FIELD_TYPES.items() if hint is int):
            value = getattr(self, key)  # a count no run reaches, or one torch cannot hold
            need(abs(value) <= MAX_ITERS, key, "must be <= 10**12")
        need(self.step_size >= 1, "step_size", "must be >= 1")
        need(self.warmup >= 0, "warmup", "iterations of warm-up, >= 0 (0: none)")
        for key in ("lr", "momentum", "weight_decay", "gamma", "power", "eps", "epochs"):
            value = getattr(self, key)
            need(math.isfinite(value) and value >= 0, key, "must be a finite number >= 0")
        need(self.epochs <= MAX_ITERS, "epochs", "must be <= 10**12")
        need(
            math.isfinite(self.budget) and 0 < self.budget <= MAX_BUDGET,
            "budget",
            f"a fraction > 0 of the configured run, at most {MAX_BUDGET:g} (above 1 the run and "
            "its schedule are stretched)",
        )
        need(self.momentum < 1, "momentum", "must be < 1")
        need(
            math.isfinite(self.sigma_factor) and self.sigma_factor > 0,
            "sigma_factor",
            "must be a finite number > 0",
        )
        need(self.max_extra_iters >= 0, "max_extra_iters", "must be >= 0")
        need(
            self.inner_solver in INNER_SOLVERS, "inner_solver", "one of " + ", ".join(INNER_SOLVERS)
        )
        need(self.window == 0 or self.window >= 2, "window", "0 (one epoch) or >= 2 batches")
        need(
            self.window <= MAX_WINDOW,
            "window",
            "at most 2**31 - 1 batches; ISGD acts only once its window has filled",
        )
        need(self.on_nonfinite in NONFINITE_POLICY, "on_nonfinite", "one of stop, skip")
        need(
            math.isfinite(self.imbalance) and self.imbalance >= 1,
            "imbalance",
            "a ratio >= 1 (1: the data as it is)",
        )
        need(0 <= self.label_noise < 1, "label_noise", "a fraction in [0, 1)")
        need(self.class_weights in ("none", "balanced"), "class_weights", "one of none, balanced")
        need(
            0 <= self.lower_quantile < 1,
            "lower_quantile",
            "0 (off), or a fraction in (0, 1)",
        )
        if self.lower_quantile > 0:
            need(self.uses_isgd, "lower_quantile", "a variant of ISGD: needs an isgd optimizer")
        from isgd.training.relatives import check_config

        check_config(self, need)
        need(self.device in ("cpu", "cuda"), "device", "one of cpu, cuda")
        need(
            math.isfinite(self.target) and self.target >= 0,
            "target",
            "a finite number >= 0 (0: none; an accuracy is a fraction)",
        )
        need(
            all(1 <= m <= MAX_ITERS for m in self.milestones),
            "milestones",
            "iterations >= 1 and <= 10**12",
        )
        need(self.milestones == sorted(self.milestones), "milestones", "must be increasing")
        if self.lr_policy == "multistep":
            need(bool(self.milestones), "milestones", "the multistep policy needs milestones")
        return self

    @property
    def workload_name(self) -> str:
        """What logs and summaries call the data and model: the workload, or dataset/model."""
        return self.workload or f"{self.dataset}/{self.model}"

    def chart_window(self, n_b: int) -> int:
        """Losses in the control chart's window: ``window``, or one epoch (``n_b``) when 0."""
        return self.window or n_b

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULTS = TrainConfig()
# the keys of the built-in image workload (isgd.training.data_setup.image_workload): a workload
# given by --workload brings its own model and data, so these stay at their defaults
IMAGE_KEYS = (
    "dataset",
    "model",
    "normalize",
    "augment",
    "crop_size",
    "imbalance",
    "label_noise",
    "class_weights",
)
# keys renamed since: files written before (config.toml, plan.json) still read
RENAMED = {"target_accuracy": "target"}

PRESETS: dict[str, dict[str, Any]] = {
    # Caffe examples/mnist/lenet_solver.prototxt
    "lenet-mnist": dict(
        dataset="mnist",
        model="lenet",
        batch_size=64,
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        lr_policy="inv",
        gamma=1e-4,
        power=0.75,
        iters=10_000,
        normalize="scale",
        eval_every=500,
        checkpoint_every=2000,
        target=0.99,
    ),
    # Caffe examples/cifar10/cifar10_quick_solver.prototxt, then _lr1 (lr 1e-4 for 1,000 more)
    "cifar10-quick": dict(
        dataset="cifar10",
        model="cifar10-quick",
        batch_size=100,
        lr=0.001,
        momentum=0.9,
        weight_decay=0.004,
        lr_policy="multistep",
        milestones=[4000],
        gamma=0.1,
        iters=5000,
        normalize="mean_subtract",
        eval_every=500,
        checkpoint_every=1000,
    ),
    # Caffe models/bvlc_alexnet/solver.prototxt and train_val.prototxt (256×256 images, random
    # 227 crops and mirroring, mean subtracted); ImageNet packed with `isgd data pack`
    "alexnet-imagenet": dict(
        dataset="imagenet",
        model="alexnet",
        batch_size=256,
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        lr_policy="step",
        gamma=0.1,
        step_size=100_000,
        iters=450_000,
        normalize="mean_subtract",
        augment=True,
        crop_size=227,
        eval_every=10_000,
        eval_batch_size=500,
        checkpoint_every=10_000,
        target=0.56,
    ),
    # a character-level GPT (≈ 1M parameters, context 128) on Shakespeare's works, nanoGPT's
    # shakespeare_char recipe (AdamW, warm-up, cosine decay) scaled to minutes on one CPU thread:
    # 1,200 steps of 16 windows (≈ 2.5M characters, half an epoch), where small batches and a
    # high rate learn fastest (README); ISGD's chart over the last 128 batches, as SkipStep's,
    # since one epoch's would never fill (isgd.training.workloads; `isgd data fetch shakespeare`)
    "charlm-shakespeare": dict(
        workload="isgd.training.workloads:charlm_shakespeare",
        optimizer="isgd-adamw",
        batch_size=16,
        lr=1e-2,
        weight_decay=0.1,
        lr_policy="cosine",
        warmup=100,
        iters=1200,
        window=128,
        validation=967,  # the validation text's windows, at the end of the training set
        eval_every=150,
        eval_batch_size=250,
        checkpoint_every=400,
    ),
}


def lr_factor(config: TrainConfig, iteration: int, total: int) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based) of a run of ``total`` iterations.

    With ``budget`` b < 1 the run is that fraction of the configured one and its schedule is
    compressed to it, not cut short (b > 1: stretched, not run on at its final rate): the
    policy is read at ``s = t / b``, so the run ends as decayed as the full one does —
    ``inv`` :math:`(1 + γ t/b)^{−p}`, ``step`` and ``multistep`` drop at ``b·step_size`` and
    ``b·m`` (to the nearest iteration at or after), ``cosine`` spans ``total`` (already the
    compressed length). ``fixed`` has nothing to decay.

    ``warmup`` W > 0 multiplies the policy's factor by the linear ramp ``min(1, (s + 1/b) / W)``
    (the full run's time, so ``b·W`` iterations at budget b): the first iteration runs at
    ``1/W`` of the rate, iteration W − 1 and every later one at the policy's.
    """
    factor = _policy_factor(config, iteration, total)
    if config.warmup:
        ramp = (iteration + 1) / (config.budget * config.warmup)
        return factor * min(1.0, ramp)
    return factor


def _policy_factor(config: TrainConfig, iteration: int, total: int) -> float:
    policy = config.lr_policy
    s = iteration if config.budget == 1 else iteration / config.budget  # the full run's time
    if policy == "fixed":
        return 1.0
    if policy == "inv":
        return (1.0 + config.gamma * s) ** (-config.power)
    if policy == "step":
        return config.gamma ** (s // config.step_size)
    if policy == "multistep":
        return config.gamma ** sum(s >= m for m in config.milestones)
    if policy == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / total))
    raise ConfigError(f"invalid lr_policy: {policy!r}")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field's type, or ConfigError naming key and expected type."""
    origin = get_origin(hint)
    if origin is list:
        (inner,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"invalid {key}: {value!r} (expected a list of {inner.__name__})")
        return [_check_type(key, v, inner) for v in value]
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[hint]
    if isinstance(value, accepted) and (hint is bool or not isinstance(value, bool)):
        return float(value) if hint is float and isinstance(value, int | float) else value
    raise ConfigError(f"invalid {key}: {value!r} (expected {hint.__name__})")


FIELD_TYPES = get_type_hints(TrainConfig)
FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def apply(config: TrainConfig, values: Mapping[str, Any], source: str) -> TrainConfig:
    """``config`` with ``values`` applied; unknown keys and wrong types name the ``source``."""
    values = {RENAMED.get(key, key): value for key, value in values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' * (len(unknown) > 1)} in {source}: "
            f"{', '.join(unknown)} (known: {', '.join(FIELDS)})"
        )
    checked = {key: _check_type(key, value, FIELD_TYPES[key]) for key, value in values.items()}
    return dataclasses.replace(config, **checked)


def parse_value(text: str) -> Any:
    """A TOML literal (``2``, ``0.1``, ``true``, ``[1, 2]``, ``"x"``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8 text
        raise ConfigError(
            f"config file {path} is not UTF-8 TOML (byte 0x{err.object[err.start]:02x} at "
            f"offset {err.start} is not UTF-8 text)"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Defaults ← ``preset`` ← ``config_file`` ← ``overrides``, validated.

    A ``preset`` key in the file selects that preset beneath the file (a different ``preset``
    argument is refused). ``iters`` and ``epochs`` in one layer are refused (``epochs`` would
    silently win); ``iters`` in a later layer replaces an earlier layer's ``epochs``.
    """
    layers: list[tuple[Mapping[str, Any], str]] = []
    if config_file is not None:
        file_keys = dict(load_toml(config_file))
        file_preset = file_keys.pop("preset", "") or ""
        if file_preset and preset and file_preset != preset:
            raise ConfigError(
                f"{config_file} names preset {file_preset!r} but --preset is {preset!r}; choose one"
            )
        preset = preset or file_preset
        layers.append((file_keys, str(config_file)))
    if overrides:
        layers.append((overrides, "the command line"))
    config = TrainConfig()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset: {preset!r} (known: {', '.join(PRESETS)})")
        config = apply(config, PRESETS[preset], f"preset {preset}")
        config.preset = preset
    for keys, where in layers:
        if "iters" in keys and keys.get("epochs"):
            raise ConfigError(
                f"{where} sets both iters ({keys['iters']}) and epochs ({keys['epochs']}); "
                "give one (epochs would replace iters)"
            )
        config = apply(config, keys, where)
        if "iters" in keys:  # a later iters replaces an earlier epochs
            config.epochs = 0.0
    own = PRESETS[preset].get("workload", "") if preset else ""
    given = [keys["workload"] for keys, _ in layers if keys.get("workload", "") not in ("", own)]
    if preset and given:  # a preset's own workload (a config.toml it wrote) is no conflict
        raise ConfigError(
            f"preset {preset} names its own model and data, and so does the workload "
            f"{given[-1]}; give one (the solver keys go as flags or in --config)"
        )
    if config.workload:
        from isgd.training.workload import resolve_spec

        config.workload = resolve_spec(config.workload)
    return config.validate()


def dump_toml(config: TrainConfig) -> str:
    """The configuration as TOML that ``--config`` reads back."""
    header = "# isgd train configuration (resolved); repeat with: isgd train --config FILE\n"
    return header + tomli_w.dumps(config.to_dict())


def check_checkpoint_config(
    checkpoint: dict[str, Any], config: TrainConfig, where: str, config_file: Path
) -> None:
    """RunError unless ``checkpoint`` was written with the model, data set, optimizer and batch
    size of ``config`` (other keys, e.g. ``iters``, may change between resumes)."""
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return
    changed = [k for k in STRUCTURAL_KEYS if k in saved and saved[k] != getattr(config, k)]
    if changed:
        was = ", ".join(f"{k} = {saved[k]!r}" for k in changed)
        now = ", ".join(f"{k} = {getattr(config, k)!r}" for k in changed)
        raise RunError(
            f"{where} was written with {was}, but {config_file} now says {now}; put the old "
            "values back to resume it, or start a new run with --out"
        )
