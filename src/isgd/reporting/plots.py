"""Figures from run directories (see docs/run-directory.md) and the numbers behind claims C1/C2.

C1: under a fixed cycle of batches some batches stay above the others epoch after epoch, measured
by the Spearman rank correlation ρ of the n_b batch losses between consecutive epochs.
C2: ISGD narrows the spread of batch losses within an epoch: per epoch σ, CV = σ/μ and
(max − μ)/σ of the regular batch losses (population σ, as the control chart uses).

Only matplotlib's object API is used (``Figure`` + ``FigureCanvasAgg``), never pyplot: no global
backend switch and no figure registry, so it is safe in threads and worker processes.

Its length is the reading of run directories (tolerant of torn and missing lines) plus one
function per figure of ``isgd plot``; the C1/C2 numbers are computed from the same parsed steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from isgd.errors import PlotError, RunError
from isgd.reporting.metric import PERCENT_METRICS, metric_key, metric_of
from isgd.reporting.metric import label as metric_label
from isgd.training import runio

__all__ = [
    "PlotError",
    "Run",
    "SpreadLine",
    "Steps",
    "load_run",
    "noise_caption",
    "plot_runs",
    "spearman",
    "spread_figure",
    "summarize_claims",
    "time_note",
]

log = logging.getLogger(__name__)

DPI = 120
MAX_LINE_POINTS = 4000  # longer series are min/max-decimated (spikes survive) or strided


@dataclass(frozen=True)
class Steps:
    """The columns of ``steps.jsonl`` sorted by iteration; a null ``loss``/``limit`` is NaN."""

    iteration: np.ndarray
    epoch: np.ndarray
    batch_id: np.ndarray
    loss: np.ndarray
    limit: np.ndarray
    triggered: np.ndarray
    extra_iters: np.ndarray

    def __len__(self) -> int:
        return len(self.iteration)


@dataclass(frozen=True)
class Run:
    """One run directory: ``metrics.jsonl`` records, ``steps.jsonl`` columns, ``summary.json``."""

    name: str
    path: Path
    metrics: list[dict[str, Any]]
    steps: Steps
    summary: dict[str, Any]

    @property
    def n_batches(self) -> int:
        """n_b: ``summary.json``'s ``n_batches_per_epoch``, else the largest batch_id + 1."""
        n = self.summary.get("n_batches_per_epoch")
        if isinstance(n, int) and n > 0:
            return n
        return int(self.steps.batch_id.max()) + 1 if len(self.steps) else 0


RunLike = str | PathLike | Run


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) pairs (:func:`isgd.training.runio.numbered_jsonl`); errors as
    PlotError."""
    try:
        return runio.numbered_jsonl(path)
    except RunError as err:
        raise PlotError(str(err)) from None


def _keep_last(iterations: np.ndarray) -> np.ndarray | None:
    """Indices keeping the last record of each iteration in order (a resumed run repeats some)."""
    if len(iterations) < 2 or np.all(np.diff(iterations) > 0):
        return None
    _, first_reversed = np.unique(iterations[::-1], return_index=True)
    return len(iterations) - 1 - first_reversed


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _parse_steps(path: Path) -> Steps:
    table = []
    for lineno, r in _read_jsonl(path):
        try:
            row = (r["iteration"], r["epoch"], r["batch_id"], _num(r["loss"]))
            extra = (_num(r.get("limit")), bool(r.get("triggered")), r.get("extra_iters") or 0)
            table.append(row + extra)
        except KeyError as e:
            raise PlotError(f"{path}:{lineno}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise PlotError(f"{path}:{lineno}: bad value ({e})") from None
    try:
        cols = np.array(table, dtype=np.float64).reshape(-1, 7)
    except (TypeError, ValueError) as e:
        raise PlotError(f"{path}: non-numeric value ({e})") from None
    if (keep := _keep_last(cols[:, 0])) is not None:
        log.info("%s: %d repeated iterations, keeping the last", path, len(cols) - len(keep))
        cols = cols[keep]
    iteration, epoch, batch_id = (cols[:, i].astype(np.int64) for i in (0, 1, 2))
    return Steps(
        iteration,
        epoch,
        batch_id,
        cols[:, 3],
        cols[:, 4],
        cols[:, 5] > 0,
        cols[:, 6].astype(np.int64),
    )


def load_run(run_dir: str | PathLike) -> Run:
    """Read a run directory; ``summary.json`` is optional (a run still in progress has none)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise PlotError(f"{path}: not a directory")
    for required in ("metrics.jsonl", "steps.jsonl"):
        if not (path / required).is_file():
            raise PlotError(f"{path}: not a run directory (no {required})")
    metrics_path = path / "metrics.jsonl"
    metrics = []
    for lineno, record in _read_jsonl(metrics_path):
        if not isinstance(record.get("iteration"), int):
            raise PlotError(f"{metrics_path}:{lineno}: missing or non-integer 'iteration'")
        metrics.append(record)
    if (keep := _keep_last(np.array([m["iteration"] for m in metrics]))) is not None:
        metrics = [metrics[i] for i in keep]
    summary: dict[str, Any] = {}
    if (summary_path := path / "summary.json").is_file():
        try:
            summary = runio.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PlotError(f"{summary_path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(summary, dict):
            raise PlotError(f"{summary_path}: expected a JSON object")
    name = str(summary.get("optimizer") or path.resolve().name)
    return Run(name, path, metrics, _parse_steps(path / "steps.jsonl"), summary)


def _as_runs(run_dirs: Sequence[RunLike]) -> list[Run]:
    """Load runs and make names unique: optimizer names, else directory names, else numbered."""
    runs = [r if isinstance(r, Run) else load_run(r) for r in run_dirs]
    if not runs:
        raise ValueError("no run directories given")
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [r.path.resolve().name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{n}-{i}" for i, n in enumerate(names)]
    return [dataclasses.replace(r, name=n) for r, n in zip(runs, names)]


# --- statistics ---------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks; ties get the mean of the ranks they span (as scipy's ``rankdata`` - 1)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends - 1) / 2, ends - starts)
    return ranks


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks; pairs with a NaN are
    dropped; NaN when fewer than 2 pairs remain or one side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return math.nan
    ra, rb = _ranks(a[keep]), _ranks(b[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denominator if denominator > 0 else math.nan


@dataclass(frozen=True)
class _EpochTable:
    epochs: np.ndarray  # the complete epochs, ascending
    loss: np.ndarray  # [n_b, len(epochs)]: loss of batch b in that epoch
    incomplete: list[int]  # epochs with steps but not every batch (e.g. a run cut short)


def _epoch_table(run: Run) -> _EpochTable:
    s, n_b = run.steps, run.n_batches
    valid = (s.batch_id >= 0) & (s.batch_id < n_b) & (s.epoch >= 0)
    epoch, batch = s.epoch[valid], s.batch_id[valid]
    if len(epoch) == 0:
        return _EpochTable(np.zeros(0, np.int64), np.zeros((n_b, 0)), [])
    counts = np.bincount(np.unique(epoch * n_b + batch) // n_b)
    complete = np.flatnonzero(counts == n_b)
    column = np.full(len(counts), -1)
    column[complete] = np.arange(len(complete))
    matrix = np.full((n_b, len(complete)), np.nan)
    in_table = column[epoch] >= 0
    matrix[batch[in_table], column[epoch[in_table]]] = s.loss[valid][in_table]
    incomplete = [int(e) for e in np.flatnonzero((counts > 0) & (counts < n_b))]
    return _EpochTable(complete, matrix, incomplete)


def _claims(run: Run, table: _EpochTable) -> dict[str, Any]:
    e, loss = table.epochs, table.loss
    pairs = [i for i in range(len(e) - 1) if e[i + 1] == e[i] + 1]
    rho = [spearman(loss[:, i], loss[:, i + 1]) for i in pairs]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean, std = np.nanmean(loss, axis=0), np.nanstd(loss, axis=0)
        cv, max_sigma = std / mean, (np.nanmax(loss, axis=0, initial=-np.inf) - mean) / std
        mean_rho = float(np.nanmean(rho)) if np.isfinite(rho).any() else math.nan
    s = run.steps
    has_limit = np.isfinite(s.limit)
    return {
        "n_batches": run.n_batches,
        "epochs": e.tolist(),
        "incomplete_epochs": table.incomplete,
        "spearman_consecutive": rho,
        "spearman_consecutive_mean": mean_rho,
        "spearman_first_last": spearman(loss[:, 0], loss[:, -1]) if len(e) > 1 else math.nan,
        "loss_mean": mean.tolist(),
        "loss_std": std.tolist(),
        "loss_cv": cv.tolist(),
        "loss_max_sigma": max_sigma.tolist(),
        "triggers": int(s.triggered.sum()),
        "extra_iters": int(s.extra_iters.sum()),
        "above_limit_rate": float(np.mean(s.loss[has_limit] > s.limit[has_limit]))
        if has_limit.any()
        else math.nan,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def summarize_claims(run_dirs: Sequence[RunLike]) -> dict[str, dict[str, Any]]:
    """Run name → the numbers behind C1 (``spearman_*``) and C2 (``loss_std``, ``loss_cv``,
    ``loss_max_sigma`` per complete epoch in ``epochs``). JSON-ready: NaN becomes None."""
    return {r.name: _jsonable(_claims(r, _epoch_table(r))) for r in _as_runs(run_dirs)}


# --- figures ------------------------------------------------------------------------------------


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _empty(fig: Figure, axes: Sequence[Axes], message: str) -> None:
    """A placeholder figure for a run without the data (still written: the file list is fixed)."""
    for ax in axes:
        ax.set_axis_off()
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="0.4")


def _log_ticks(ax: Axes, scale: bool = True, subs: tuple[float, ...] = (1.0, 2.0, 5.0)) -> None:
    """Log y axis with plain-number ticks at ``subs`` × 10^k (``scale=False``: already log)."""
    if scale:
        ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _per(n: float) -> Any:
    """``x / n`` over arrays (a secondary axis' forward function)."""
    return lambda x: np.asarray(x, dtype=np.float64) / n


def _times(n: float) -> Any:
    return lambda x: np.asarray(x, dtype=np.float64) * n


def _spans_decades(values: np.ndarray, ratio: float = 30.0) -> bool:
    v = values[np.isfinite(values)]
    return len(v) > 0 and v.min() > 0 and v.max() / v.min() > ratio


def _time_unit(seconds: float) -> tuple[float, str]:
    return (3600.0, "h") if seconds > 7200 else (60.0, "min") if seconds > 600 else (1.0, "s")


def _metric_curve(run: Run) -> tuple[tuple[Any, Any], ...]:
    """(iteration, metric) at every evaluation of ``run``."""
    key = metric_key(run.metrics)
    return tuple((m.get("iteration"), m.get(key)) for m in run.metrics)


def _metric_of(runs: Sequence[Run]) -> tuple[str, bool]:
    """The metric of these runs (the first run's; accuracy for runs written before workloads)."""
    return metric_of(runs[0].summary) if runs else ("accuracy", True)


def _metric_label(runs: Sequence[Run]) -> str:
    return metric_label(_metric_of(runs)[0])


def noise_caption(runs: Sequence[Run], x_key: str) -> str:
    """What a figure of these runs cannot show, in words: ISGD runs that never triggered, runs
    that did identical computation, and (on a time axis) that the times of separate runs differ
    by the machine's load as well (:func:`time_note`)."""
    notes = []
    idle = [
        r.name
        for r in runs
        if str(r.summary.get("optimizer", "")).startswith("isgd")
        and r.summary.get("isgd/triggers") == 0
    ]
    if idle:
        notes.append(
            f"{', '.join(idle)}: ISGD never triggered — the same computation as its base optimizer"
        )
    curves = {r.name: _metric_curve(r) for r in runs}
    names = list(curves)
    same = [
        f"{a} = {b}"
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if curves[a] and curves[a] == curves[b]
    ]
    if same:
        label = _metric_label(runs)
        notes.append(f"identical {label} at every evaluation: {'; '.join(same)}")
    if x_key == "time/train_seconds" and (note := time_note(runs, same=bool(same or idle))):
        notes.append(note.replace("\n", " "))
    return "\n".join(notes)


def time_note(runs: Sequence[Run], same: bool = False) -> str:
    """Why a wall-clock axis of several runs is no comparison of speed: each run was timed on its
    own, under whatever else the machine was doing (``same``: they did the same computation).
    Empty for one run."""
    if len(runs) < 2:
        return ""
    head = f"wall-clock time, measured in {len(runs)} separate runs: machine load differs"
    if same:
        return (
            f"{head} between them,\nand they did the same computation: "
            "differences in time are machine load, not speed"
        )
    return (
        f"{head} between them, so time differences are not speed:\n"
        "compare passes (accuracy_vs_passes.png); `isgd compare` runs seeds and gives intervals"
    )


def _zoom(points: np.ndarray, higher: bool, percent: bool) -> tuple[float, float]:
    """The y range of the plateau, not the climb: the best 3/4 of the evaluations (≥ 2 points
    of a percentage)."""
    if higher:
        high = float(points.max())
        low = float(np.percentile(points, 25))
        low = min(low, high - 2.0) if percent else low
    else:
        low, high = float(points.min()), float(np.percentile(points, 75))
    margin = 0.06 * (high - low) or 0.05 * (abs(high) or 1.0)
    low, high = low - margin, high + margin
    return (max(low, 0.0), min(high, 100.0)) if percent else (low, high)


def _accuracy_figure(runs: list[Run], colors: list, x_key: str, path: Path) -> Path:
    """The metric against passes or time (left, zoomed on the plateau) and, for accuracy, the
    test error on a log scale (right); for another metric the test loss (right)."""
    metric, higher = _metric_of(runs)
    percent = metric in PERCENT_METRICS
    name = metric_label(metric)
    fig, (ax_acc, ax_err) = _figure(12, 4.8, 2)
    series = []
    for run, color in zip(runs, colors):
        key = metric_key(run.metrics)
        recs = [m for m in run.metrics if m.get(key) is not None and x_key in m]
        x = np.array([m[x_key] for m in recs], dtype=np.float64)
        value = np.array([m[key] for m in recs], dtype=np.float64) * (100 if percent else 1)
        loss = np.array([_num(m.get("test/loss")) for m in recs], dtype=np.float64)
        after_first = np.array([m["iteration"] > 0 for m in recs], dtype=bool)
        series.append((run, color, x, value, loss, after_first))
    scale, unit = 1.0, ""
    if x_key == "time/train_seconds":
        scale, unit = _time_unit(max((s[2].max() for s in series if len(s[2])), default=0.0))
    zoom: list[float] = []
    for run, color, x, value, loss, after_first in series:
        if len(x) == 0:
            continue
        style = {"marker": "o", "ms": 4 if len(x) <= 40 else 2.5, "lw": 1.5, "color": color}
        best = np.nanmax(value) if higher else np.nanmin(value)
        shown = f" (best {best:.2f} %)" if percent else f" (best {best:.4g})"
        ax_acc.plot(x / scale, value, label=run.name + shown, **style)
        right = 100 - value if percent else loss
        ax_err.plot(x / scale, np.where(right > 0, right, np.nan), label=run.name, **style)
        zoom.extend(value[after_first if after_first.any() else slice(None)])
    points = np.array(zoom, dtype=np.float64)
    points = points[np.isfinite(points)]
    if len(points):
        ax_acc.set_ylim(*_zoom(points, higher, percent))
        ax_acc.legend(loc="lower right" if higher else "upper right", fontsize=9)
        _log_ticks(ax_err)
    else:
        _empty(fig, [ax_acc, ax_err], "no evaluation recorded yet")
        return _save(fig, path)
    if x_key == "passes":
        xlabel, what = "forward+backward passes (incl. ISGD extra iterations)", "passes"
        for ax in (ax_acc, ax_err):
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    else:
        xlabel = f"wall-clock training time ({unit}, evaluation excluded)"
        what = "wall-clock time"
    direction = "" if percent else f", {'higher' if higher else 'lower'} is better"
    ax_acc.set(
        xlabel=xlabel,
        ylabel=f"test {name}" + (" (%)" if percent else direction),
        title=f"Test {name} vs {what} (zoomed)",
    )
    if percent:
        ax_err.set(xlabel=xlabel, ylabel="test error (%, log scale)", title=f"Test error vs {what}")
    else:
        ax_err.set(xlabel=xlabel, ylabel="test loss (log scale)", title=f"Test loss vs {what}")
    caption = noise_caption(runs, "passes")  # what no axis shows: idle or identical runs
    if x_key == "time/train_seconds" and (note := time_note(runs, same=bool(caption))):
        fig.suptitle(note, fontsize=10.5, color="#a00000")  # on top: read before the curves
    if caption:
        fig.supxlabel(caption, fontsize=9, color="#444444")
    return _save(fig, path)


def _decimate(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most ~MAX_LINE_POINTS points keeping each bin's min and max, so spikes stay visible."""
    n = len(y)
    if n <= MAX_LINE_POINTS:
        return x, y
    bins = MAX_LINE_POINTS // 2
    width = math.ceil(n / bins)
    padded = np.full(bins * width, np.nan)
    padded[:n] = y
    blocks = padded.reshape(bins, width)
    lo = np.argmin(np.where(np.isnan(blocks), np.inf, blocks), axis=1)
    hi = np.argmax(np.where(np.isnan(blocks), -np.inf, blocks), axis=1)
    base = np.arange(bins) * width
    idx = np.unique(np.r_[base + lo, base + hi])
    idx = idx[idx < n]
    return x[idx], y[idx]


def _running_mean(y: np.ndarray, window: int) -> np.ndarray:
    c = np.r_[0.0, np.cumsum(np.nan_to_num(y))]
    out = c[1:] / np.arange(1, len(y) + 1)  # expanding mean until the window is full
    out[window - 1 :] = (c[window:] - c[:-window]) / window
    return out


def _batch_loss_figure(run: Run, color: Any, path: Path) -> Path:
    fig, (ax,) = _figure(12, 5)
    s, n_b = run.steps, run.n_batches
    if len(s) == 0:
        _empty(fig, [ax], f"{run.name}: steps.jsonl has no step records")
        return _save(fig, path)
    x, y = _decimate(s.iteration, s.loss)
    label = "batch loss" + (" (min and max of each bin)" if len(x) < len(s) else "")
    ax.plot(x, y, lw=0.5, color="0.6", label=label)
    window = max(1, min(n_b, len(s) // 20))
    stride = max(1, len(s) // MAX_LINE_POINTS)
    mean = _running_mean(s.loss, window)
    label = f"running mean ({window} iterations)"
    ax.plot(s.iteration[::stride], mean[::stride], color="black", lw=1.2, label=label)
    if np.isfinite(s.limit).any():
        optimizer = str(run.summary.get("optimizer", "isgd")).lower()
        applied = optimizer.startswith("isgd") or s.triggered.any()
        label = "control limit" + ("" if applied else " (monitored, not applied)")
        ls = "-" if applied else "--"
        ax.plot(s.iteration[::stride], s.limit[::stride], color=color, lw=1.6, ls=ls, label=label)
    if (n_trig := int(s.triggered.sum())) > 0:
        label = f"triggered ({n_trig}, {int(s.extra_iters.sum())} extra iterations)"
        x, y = s.iteration[s.triggered], s.loss[s.triggered]
        ax.scatter(x, y, s=12, color="red", lw=0, zorder=3, label=label)
    starts = s.iteration[1:][np.diff(s.epoch) != 0] - 0.5
    if 0 < len(starts) <= 60:
        transform = ax.get_xaxis_transform()
        ax.vlines(starts, 0, 1, transform=transform, colors="0.35", lw=0.6, ls=":", alpha=0.6)
    ax.grid(False, axis="x")  # vertical lines are the epoch boundaries
    if n_b > 0:
        top = ax.secondary_xaxis("top", functions=(_per(n_b), _times(n_b)))
        top.set_xlabel("epoch (dotted lines: epoch boundaries)")
    log_y = _spans_decades(s.loss)
    if log_y:
        _log_ticks(ax)
    ylabel = "batch loss" + (" (log scale)" if log_y else "")
    ax.set(xlabel="iteration", ylabel=ylabel, title=f"{run.name}: loss of each regular batch")
    ax.set_xlim(s.iteration[0] - 0.5, s.iteration[-1] + 0.5)
    ax.legend(loc="upper right", fontsize=9)
    return _save(fig, path)


def _heatmap_figure(run: Run, path: Path) -> Path:
    table = _epoch_table(run)
    fig, (ax_loss, ax_rank) = _figure(12, 5.5, 2)
    n_b, n_e = table.loss.shape
    if n_e == 0:
        _empty(fig, [ax_loss, ax_rank], f"{run.name}: no complete epoch yet")
        return _save(fig, path)
    ranks = np.full_like(table.loss, np.nan)
    for j in range(n_e):
        ok = np.isfinite(table.loss[:, j])
        ranks[ok, j] = _ranks(table.loss[ok, j]) / max(ok.sum() - 1, 1)
    order = np.argsort(-np.nanmean(ranks, axis=1), kind="stable")
    positive = table.loss[np.isfinite(table.loss) & (table.loss > 0)]
    log_norm = bool(len(positive) == table.loss.size and positive.max() > positive.min())
    norm = LogNorm(positive.min(), positive.max()) if log_norm else Normalize()
    extent = (-0.5, n_e - 0.5, n_b - 0.5, -0.5)
    panels = [
        (ax_loss, table.loss, norm, "viridis", "batch loss" + (" (log colour scale)" * log_norm)),
        (ax_rank, ranks, Normalize(0, 1), "RdBu_r", "within-epoch rank (0 lowest, 1 highest loss)"),
    ]
    ticks = np.unique(np.linspace(0, n_e - 1, min(n_e, 12)).round().astype(int))
    for ax, data, nrm, cmap, label in panels:
        image = ax.imshow(data[order], aspect="auto", norm=nrm, cmap=cmap, extent=extent)
        bar = fig.colorbar(image, ax=ax, label=label, fraction=0.06, pad=0.02)
        if isinstance(nrm, LogNorm) and nrm.vmax is not None and nrm.vmin is not None:
            _log_ticks(bar.ax, False, (1.0, 2.0, 5.0) if nrm.vmax / nrm.vmin < 1e3 else (1.0,))
        ax.grid(False)
        ax.set_xticks(ticks, labels=[str(table.epochs[t]) for t in ticks])
        ax.set_xlabel("epoch")
        if n_b <= 30:
            ax.set_yticks(np.arange(n_b), labels=[str(b) for b in order], fontsize=7)
            ax.set_ylabel("batch_id (sorted by mean rank, hardest on top)")
        else:
            ax.set_yticks([])
            ax.set_ylabel(f"{n_b} fixed batches, sorted by mean rank (hardest on top)")
    ax_loss.set_title("loss")
    ax_rank.set_title("rank within each epoch")
    claims = _claims(run, table)
    rho = claims["spearman_consecutive_mean"]
    n_pairs = int(np.isfinite(claims["spearman_consecutive"]).sum())
    if n_pairs:
        text = (
            f"Spearman ρ of batch losses, consecutive epochs: mean {rho:.3f} over {n_pairs} "
            f"pairs; first→last epoch {claims['spearman_first_last']:.3f}"
        )
    else:
        text = "Spearman ρ: needs two consecutive complete epochs"
    if table.incomplete:
        text += f"  (incomplete epoch {', '.join(map(str, table.incomplete))} left out)"
    fig.suptitle(f"{run.name}: each fixed batch's loss across epochs (C1)\n{text}", fontsize=11)
    return _save(fig, path)


_Series = Sequence[float] | np.ndarray
SpreadLine = tuple[str, Any, _Series, _Series, _Series]  # label, colour, epochs, σ, CV


def spread_figure(lines: Sequence[SpreadLine], path: Path, note: str = "") -> Path:
    """The C2 figure ``loss_spread.png`` (of ``isgd plot`` and of ``isgd compare``): σ and CV of
    the regular batch losses per complete epoch, one line per ``(label, colour, epochs, σ, CV)``;
    ``note`` is a second line under the title."""
    fig, (ax_std, ax_cv) = _figure(12, 4.8, 2)
    lines = [line for line in lines if len(line[2])]
    if not lines:
        _empty(fig, [ax_std, ax_cv], "no complete epoch yet")
        return _save(fig, path)
    for label, color, epochs, std, cv in lines:
        style = {"marker": "o", "ms": 4 if len(epochs) <= 40 else 2, "color": color}
        ax_std.plot(epochs, std, label=label, **style)
        ax_cv.plot(epochs, cv, label=label, **style)
    if _spans_decades(np.concatenate([np.asarray(line[3], dtype=float) for line in lines]), 10):
        _log_ticks(ax_std)
    ax_cv.legend(fontsize=9)
    for ax in (ax_std, ax_cv):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
    ax_std.set(ylabel="σ of batch losses", title="Spread within each epoch: standard deviation")
    ax_cv.set(ylabel="CV = σ / mean", title="Spread relative to the mean: coefficient of variation")
    title = "Spread of the regular batch losses per epoch (C2)"
    fig.suptitle(f"{title}\n{note}" if note else title, fontsize=11)
    return _save(fig, path)


def _spread_of_runs(runs: list[Run], colors: list, path: Path) -> Path:
    lines: list[SpreadLine] = []
    left_out: list[str] = []
    for run, color in zip(runs, colors):
        table = _epoch_table(run)
        if len(table.epochs) == 0:
            continue
        c = _claims(run, table)
        lines.append((run.name, color, table.epochs, c["loss_std"], c["loss_cv"]))
        left_out += [f"{run.name}: {e}" for e in table.incomplete]
    note = f"incomplete epochs left out: {'; '.join(left_out)}" if left_out else ""
    return spread_figure(lines, path, note)


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "run"


def plot_runs(run_dirs: Sequence[RunLike], out_dir: str | PathLike) -> list[Path]:
    """Write accuracy_vs_passes (the comparison: the work each run did, whatever the machine's
    load), accuracy_vs_time (secondary: wall-clock time, with :func:`time_note` on it),
    loss_spread and, per run, batch_loss_<name> and batch_heatmap_<name> as PNG into
    ``out_dir``; return the paths written."""
    runs = _as_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = [colormaps["tab10"](i % 10) for i in range(len(runs))]
    written = [
        _accuracy_figure(runs, colors, "passes", out / "accuracy_vs_passes.png"),
        _accuracy_figure(runs, colors, "time/train_seconds", out / "accuracy_vs_time.png"),
    ]
    for run, color in zip(runs, colors):
        name = _file_part(run.name)
        written.append(_batch_loss_figure(run, color, out / f"batch_loss_{name}.png"))
        written.append(_heatmap_figure(run, out / f"batch_heatmap_{name}.png"))
    written.append(_spread_of_runs(runs, colors, out / "loss_spread.png"))
    log.info("wrote %d figures to %s", len(written), out)
    return written
