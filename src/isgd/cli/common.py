"""What every subcommand shares: the parser class that turns usage errors into one line, exit
codes, and the flags of the training configuration."""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any, NoReturn, get_origin

from isgd.data import registry as datasets
from isgd.errors import UsageError
from isgd.training.config import FIELD_TYPES, FIELDS, OPTIMIZERS, TrainConfig

__all__ = [
    "HELP",
    "USAGE_ERROR",
    "Parser",
    "UsageError",
    "add_config_flags",
    "int_list",
    "nonempty_int_list",
    "path_arg",
]

log = logging.getLogger("isgd")

USAGE_ERROR = 2  # bad input of any kind: flags, config, data, run directory, checkpoint, disk
DIVERGED = 3  # the loss (or the weights) became non-finite; the last good checkpoint is kept
DIST_FAILED = 4  # data parallel: a rank died, hung or disconnected; the last checkpoint is kept

# flags shown first in --help with a short description; every other TrainConfig field follows
HELP = {
    "optimizer": "a base, sgd, nesterov, adam or adamw (torch's), or METHOD-BASE (METHOD alone: "
    "over sgd) with METHOD isgd (the paper's), skipstep (OLMo-core's SkipStep) or "
    f"selective-backprop (Composer's): {', '.join(OPTIMIZERS)}",
    "iters": "training iterations (regular steps)",
    "epochs": "train this many epochs instead of --iters",
    "eval_every": "evaluate on the test split every N iterations (untimed)",
    "checkpoint_every": "write a checkpoint every N iterations",
    "seed": "seed of the initialisation and of the fixed batch order",
    "threads": "torch CPU threads (per process when data parallel)",
    "device": "cpu or cuda (data parallel: GPU LOCAL_RANK, NCCL)",
    "dataset": datasets.describe(),
    "model": "lenet, lenet-bn, cifar10-quick, mlp, resnet20, alexnet",
    "lr_policy": "fixed, step, multistep, inv or cosine",
    "milestones": "multistep policy: comma-separated iterations",
    "sigma_factor": "ISGD: k in limit = mean + k*sigma",
    "max_extra_iters": "ISGD: extra iterations at most on a triggered batch",
    "eps": "ISGD: conservative weight epsilon",
    "inner_solver": "ISGD: update of the extra iterations: base (the base optimizer's step, "
    "shared momentum), gd (w -= lr*grad phi) or momentum (a fresh velocity per trigger)",
    "freeze_bn_stats": "ISGD: keep BatchNorm statistics unchanged by extra passes",
    "window": "ISGD: control chart window in batches, 0 = one epoch (a variant when not 0)",
    "normalize": "scale (x/256), standardize or mean_subtract",
    "reshuffle": "reshuffle every epoch instead of the fixed cycle (ablation)",
    "augment": "random crop (padding 4, or --crop-size) and horizontal flip of training images",
    "crop_size": "train on SxS crops (random with --augment), evaluate on the centre crop",
    "target": "report time and passes to reach this value of the test metric (accuracy: a "
    "fraction)",
    "warmup": "iterations of linear learning-rate warm-up (compressed with --budget); 0: none",
    "budget": "train this fraction of the run (> 0; above 1 stretches it), its learning-rate "
    "schedule compressed or stretched to it and fully decayed",
    "validation": "hold out the last N training samples: the evaluations read them, the test "
    "split is read once at the end",
    "workload": "FILE.py:FUNC or package.module:FUNC: FUNC(seed) returns an "
    "isgd.experiments.Workload (your model and data) instead of --dataset/--model",
    "on_nonfinite": "stop (exit code 3) or skip: what a NaN or infinite batch loss does",
    "batch_size": "samples per training batch (per step, all processes together)",
    "lr": "base learning rate (the policy scales it)",
    "momentum": "SGD momentum (sgd, nesterov and their isgd variants)",
    "weight_decay": "L2 weight decay",
    "gamma": "inv: lr*(1 + gamma*t)^-power; step/multistep: factor per drop",
    "power": "inv policy's exponent",
    "step_size": "step policy: iterations between drops",
    "eval_batch_size": "samples per evaluation batch (memory only; results do not change)",
    "log_every": "a progress line every N iterations when the output is not a terminal",
    "channels_last": "channels-last memory format for the convolutions (speed only)",
    "step_records": "write steps.jsonl (one line per step: loss, limit, decisions)",
    "tensorboard": "write TensorBoard event files under RUN_DIR/tb",
    "imbalance": "long-tailed training set: n_max/n_min of an exponential profile, e.g. 100 "
    "(seeded by --seed; 1 = as it is)",
    "label_noise": "fraction of training labels flipped to another class (seeded by --seed)",
    "class_weights": "none or balanced (w_c = N/(K n_c)): the usual remedy for imbalance",
    "lower_quantile": "VARIANT, not the paper's ISGD: a batch whose loss is below this quantile "
    "of the window gets a forward pass only (no backward, no update); 0 = off",
    "skip_sigma_factor": "skipstep: no update when the loss is above mean + this many sigma of "
    "the rolling window (inf: never)",
    "skip_window": "skipstep: the losses (and gradient norms) in its rolling window; it acts "
    "once half of them are in",
    "skip_grad_norm": "skipstep: also skip a step whose gradient norm is above its own mean + "
    "skip_sigma_factor sigma",
    "keep": "selective-backprop: the fraction of a batch back-propagated, drawn by loss "
    "percentile from a no-grad forward",
    "keep_start": "selective-backprop (and random_keep): selecting from this fraction of the run",
    "keep_end": "selective-backprop (and random_keep): ... until this fraction of the run",
    "keep_interrupt": "selective-backprop (and random_keep): every N-th batch trains whole (2: "
    "every other; 0: none)",
    "random_skip_steps": "random control: this fraction of the steps forward-only (no backward, "
    "no update), drawn at random from --seed; 0 = off",
    "random_keep": "random control: back-propagate this fraction of a batch drawn at random, on "
    "the selective-backprop schedule (keep_start, keep_end, keep_interrupt); 0 = off",
}


# a value that starts with "-" but is a number or a comma-separated list of numbers (``--tune-lrs
# -0.1,0.1``, ``--milestones -5``) is the option's value, not an unknown option: the option's own
# check then refuses it by name (no option of isgd looks like a negative number)
_NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
_NEGATIVE_NUMBERS = re.compile(rf"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(,\s*{_NUMBER})*,?$")


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBERS  # argparse's own: one number only

    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        raise UsageError(f"{message} (see: {self.prog} --help)")


def path_arg(text: str) -> str:
    """A path given on the command line: an empty one is refused (it is never what was meant:
    ``--out ''`` would otherwise fall back to the default directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or directory name")
    return text


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None


def nonempty_int_list(text: str) -> list[int]:
    """:func:`int_list` where an empty list means nothing (seeds, process counts, sizes)."""
    values = int_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"an empty list: {text!r} (give N,N,...)")
    return values


def add_config_flags(
    parser: argparse.ArgumentParser, hidden: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> None:
    """One flag per configuration key; those in ``hidden`` are parsed (so that the command can
    refuse them by name) but left out of the help, those in ``skip`` the command defines itself."""
    defaults = TrainConfig()
    ordered = [k for k in HELP if k in FIELDS] + [k for k in FIELDS if k not in HELP]
    group = parser.add_argument_group("training configuration (override preset and --config)")
    for name in ordered:
        if name == "preset" or name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        hint = FIELD_TYPES[name]
        default = getattr(defaults, name)
        help_text = f"{HELP.get(name, '')} (default {default!r})".strip()
        if name in hidden:
            help_text = argparse.SUPPRESS
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(hint) is list:
            group.add_argument(flag, type=int_list, metavar="N,N,...", **kwargs)
        else:
            group.add_argument(flag, type=hint, metavar=hint.__name__.upper(), **kwargs)


def add_data_and_progress_flags(parser: argparse.ArgumentParser, progress: str) -> None:
    parser.add_argument(
        "--data-dir", type=path_arg, help="default: $ISGD_DATA_DIR or ~/.cache/isgd/data"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"{progress} (default: when the output is a terminal)",
    )
