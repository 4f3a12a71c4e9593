from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from isgd.reporting.plots import PlotError, load_run, plot_runs, spearman, summarize_claims
from isgd.training import runio

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_losses(
    n_epochs: int,
    n_batches: int,
    *,
    seed: int = 0,
    persistent: bool = True,
    spread: float = 1.0,
    noise: float = 0.25,
) -> np.ndarray:
    """[epoch, batch_id] losses: a decaying level × a per-batch hardness × noise × rare spikes. With
    ``persistent`` the hardness is fixed across epochs (C1); else redrawn every epoch."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_epochs * n_batches).reshape(n_epochs, n_batches) / n_batches
    level = 2.3 * np.exp(-3 * t) + 0.08 * np.exp(-t / 4) + 0.005
    shape = (1 if persistent else n_epochs, n_batches)
    hardness = rng.lognormal(0.0, 0.7 * spread, shape)
    spikes = np.where(rng.random((n_epochs, n_batches)) < 0.02, 5.0, 1.0)  # rare outliers
    return level * hardness * spikes * rng.lognormal(0.0, noise, (n_epochs, n_batches))


def write_run(
    path: Path,
    losses: np.ndarray,
    *,
    optimizer: str = "isgd",
    n_steps: int | None = None,
    summary: bool = True,
    eval_every: int | None = None,
    seconds_per_pass: float = 0.015,
    seed: int = 0,
) -> Path:
    """A run directory in the documented format from an [epoch, batch_id] loss table; ``n_steps``
    cuts the run short (an incomplete last epoch). ISGD gets a limit (mean + 3σ of the previous
    n_b losses, null in epoch 0) and triggers; other optimizers get ``limit: null``. ``seed``
    draws the evaluation noise."""
    n_b = losses.shape[1]
    flat = losses.reshape(-1)[:n_steps]
    n = len(flat)
    limit = np.full(n, np.nan)
    if optimizer == "isgd" and n > n_b:
        s1, s2 = np.r_[0, np.cumsum(flat)], np.r_[0, np.cumsum(flat**2)]
        i = np.arange(n_b, n)
        mean = (s1[i] - s1[i - n_b]) / n_b
        limit[n_b:] = mean + 3 * np.sqrt(np.maximum((s2[i] - s2[i - n_b]) / n_b - mean**2, 0))
    triggered = np.nan_to_num(flat - limit, nan=-1.0) > 0
    extra = np.where(triggered, 1 + np.arange(n) % 4, 0)
    passes = np.arange(1, n + 1) + np.cumsum(extra)
    path.mkdir(parents=True)
    with open(path / "steps.jsonl", "w") as f:
        for k in range(n):
            record = {
                "iteration": k + 1, "epoch": k // n_b, "batch_id": k % n_b,
                "loss": float(flat[k]), "limit": None if np.isnan(limit[k]) else float(limit[k]),
                "triggered": bool(triggered[k]), "extra_iters": int(extra[k]),
                "loss_after": float(flat[k] / 2) if triggered[k] else None,
                "passes": int(passes[k]),
            }  # fmt: skip
            f.write(json.dumps(record) + "\n")
    eval_every = eval_every or max(1, n_b // 2)
    bonus = 1.15 if optimizer == "isgd" else 1.0
    rng = np.random.default_rng(seed)
    with open(path / "metrics.jsonl", "w") as f:
        for it in sorted({*range(0, n + 1, eval_every), n}):
            p = int(passes[it - 1]) if it else 0
            accuracy = 0.992 - 0.89 * np.exp(-bonus * p / (0.4 * n_b)) - 0.02 * np.exp(-p / n_b)
            accuracy = min(accuracy + rng.normal(0, 0.0008) * (it > 0), 1.0)
            record = {
                "iteration": it, "epoch": round(it / n_b, 3), "passes": p,
                "time/train_seconds": p * seconds_per_pass, "train/loss": 0.1,
                "test/loss": 0.05, "test/accuracy": float(accuracy), "lr": 0.01,
                "isgd/triggers": int(triggered[:it].sum()),
                "isgd/extra_iters": int(extra[:it].sum()),
            }  # fmt: skip
            f.write(json.dumps(record) + "\n")
    if summary:
        record = {"optimizer": optimizer, "iterations": n, "passes": int(passes[-1]),
                  "n_batches_per_epoch": n_b, "seed": 0}  # fmt: skip
        (path / "summary.json").write_text(json.dumps(record))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


FIGURE_SIZES = {  # pixels at 120 dpi
    "accuracy_vs_time.png": (1440, 576),
    "accuracy_vs_passes.png": (1440, 576),
    "loss_spread.png": (1440, 576),
    "batch_loss": (1440, 600),
    "batch_heatmap": (1440, 660),
}


def check_pngs(paths: list[Path]) -> None:
    for p in paths:
        assert p.is_file() and p.stat().st_size > 5000, p
        key = p.name if p.name in FIGURE_SIZES else p.name.rsplit("_", 1)[0]
        assert png_size(p) == FIGURE_SIZES[key], p.name


@pytest.mark.slow
def test_plot_runs_writes_every_figure(tmp_path: Path):
    isgd = write_run(tmp_path / "a", synthetic_losses(5, 20, seed=1), optimizer="isgd")
    sgd = write_run(tmp_path / "b", synthetic_losses(5, 20, seed=2), optimizer="sgd")
    assert load_run(isgd).steps.triggered.any()  # the ISGD run does trigger
    paths = plot_runs([isgd, sgd], tmp_path / "figs")
    names = {p.name for p in paths}
    assert names == {
        "accuracy_vs_time.png", "accuracy_vs_passes.png", "loss_spread.png",
        "batch_loss_isgd.png", "batch_heatmap_isgd.png",
        "batch_loss_sgd.png", "batch_heatmap_sgd.png",
    }  # fmt: skip
    assert {p.parent for p in paths} == {tmp_path / "figs"}
    check_pngs(paths)


def monitored_sgd_run(path: Path) -> Path:
    """An SGD run whose chart is computed for monitoring: limits present, never triggered."""
    run = write_run(path, synthetic_losses(5, 20, seed=1), optimizer="isgd")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "optimizer": "sgd"}))
    lines = [runio.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    text = "".join(json.dumps({**r, "triggered": False, "extra_iters": 0}) + "\n" for r in lines)
    (run / "steps.jsonl").write_text(text)
    return run


@pytest.mark.slow
def test_edge_cases_share_one_plot_call(tmp_path: Path):
    one = write_run(tmp_path / "one", synthetic_losses(1, 20), optimizer="sgd")  # one epoch
    cut = write_run(tmp_path / "cut", synthetic_losses(4, 20), n_steps=70, summary=False)
    fresh = tmp_path / "fresh"  # just started: no step yet, only the evaluation at iteration 0
    fresh.mkdir()
    (fresh / "steps.jsonl").write_text("")
    (fresh / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "test/accuracy": 0.1}) + "\n")
    monitored = monitored_sgd_run(tmp_path / "monitored")
    runs = [one, cut, fresh, monitored]
    paths = plot_runs(runs, tmp_path / "figs")
    # "sgd" twice: every run is named after its directory
    assert {p.name for p in paths} >= {f"batch_heatmap_{r.name}.png" for r in runs}
    assert len(paths) == 3 + 2 * len(runs)
    check_pngs(paths)
    claims = summarize_claims(runs)
    assert claims["one"]["epochs"] == [0] and claims["one"]["spearman_consecutive_mean"] is None
    assert claims["one"]["above_limit_rate"] is None and claims["one"]["triggers"] == 0
    assert claims["cut"]["epochs"] == [0, 1, 2] and claims["cut"]["incomplete_epochs"] == [3]
    assert len(claims["cut"]["loss_std"]) == 3 and len(claims["cut"]["spearman_consecutive"]) == 2
    assert claims["fresh"]["epochs"] == [] and claims["fresh"]["loss_std"] == []
    assert claims["monitored"]["triggers"] == 0 and claims["monitored"]["above_limit_rate"] > 0


def test_names_optimizer_then_directory_then_numbered(tmp_path: Path):
    runs = [write_run(tmp_path / f"seed{i}", synthetic_losses(2, 5, seed=i)) for i in (0, 1)]
    assert load_run(runs[0]).name == "isgd"
    assert set(summarize_claims(runs[:1])) == {"isgd"}
    assert set(summarize_claims(runs)) == {"seed0", "seed1"}
    same = [write_run(tmp_path / d / "run", synthetic_losses(2, 5)) for d in "ab"]
    assert set(summarize_claims(same)) == {"run-0", "run-1"}


def test_spearman_hand_computed():
    # no ties: d = (0, -1, 1, -1, 1), ρ = 1 − 6·Σd² / (n(n² − 1)) = 1 − 24/120
    assert spearman([10, 20, 30, 40, 50], [1, 3, 2, 5, 4]) == pytest.approx(0.8)
    # ties get the average rank: b → ranks (1, 2, 3.5, 5, 3.5); Pearson of ranks = 8 / √95
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, math.nan, 4], [1, 2, 9, 3]) == pytest.approx(1.0)  # NaN pair dropped
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant side


def test_c1_persistent_batches_correlate_and_shuffled_ones_do_not(tmp_path: Path):
    persistent = synthetic_losses(8, 100, seed=3, noise=0.1)
    persistent = write_run(tmp_path / "p", persistent, optimizer="sgd")
    shuffled = synthetic_losses(8, 100, seed=3, noise=0.1, persistent=False)
    shuffled = write_run(tmp_path / "s", shuffled, optimizer="sgd")
    claims = summarize_claims([persistent, shuffled])
    assert claims["p"]["spearman_consecutive_mean"] > 0.85
    assert abs(claims["s"]["spearman_consecutive_mean"]) < 0.15
    assert len(claims["p"]["spearman_consecutive"]) == 7


def test_c2_spread_per_epoch_matches_numpy(tmp_path: Path):
    losses = np.arange(1.0, 13.0).reshape(3, 4) ** np.array([[1.0], [0.5], [2.0]])
    claims = summarize_claims([write_run(tmp_path / "r", losses, optimizer="sgd")])["sgd"]
    mean, std = losses.mean(axis=1), losses.std(axis=1)
    np.testing.assert_allclose(claims["loss_mean"], mean)
    np.testing.assert_allclose(claims["loss_std"], std)
    np.testing.assert_allclose(claims["loss_cv"], std / mean)
    np.testing.assert_allclose(claims["loss_max_sigma"], (losses.max(axis=1) - mean) / std)


def test_plot_error_on_missing_file(tmp_path: Path):
    run = write_run(tmp_path / "r", synthetic_losses(2, 5))
    (run / "steps.jsonl").unlink()
    with pytest.raises(PlotError, match=r"not a run directory \(no steps.jsonl\)"):
        load_run(run)
    with pytest.raises(PlotError, match="not a directory"):
        load_run(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "malformed JSON"),
        ('{"iteration": 3, "epoch": 0, "batch_id": 2}', "missing key 'loss'"),
        ('{"iteration": 3, "epoch": 0, "batch_id": 2, "loss": "high"}', "bad value"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_plot_error_names_file_and_line(tmp_path: Path, line: str, message: str):
    run = write_run(tmp_path / "r", synthetic_losses(2, 5))
    path = run / "steps.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PlotError) as err:
        load_run(run)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_plot_error_on_malformed_summary_and_metrics(tmp_path: Path):
    run = write_run(tmp_path / "r", synthetic_losses(2, 5))
    (run / "summary.json").write_text('{"optimizer": "isgd",\n oops}')
    with pytest.raises(PlotError, match=r"summary.json:2: malformed JSON"):
        load_run(run)
    (run / "summary.json").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"passes": 3}\n')
    with pytest.raises(PlotError, match=r"metrics.jsonl:\d+: missing or non-integer 'iteration'"):
        load_run(run)


def test_truncated_last_line_is_skipped_and_repeated_iterations_keep_the_last(tmp_path: Path):
    run = write_run(tmp_path / "r", synthetic_losses(2, 5))
    with open(run / "steps.jsonl", "a") as f:  # a resumed run re-did iteration 9, then died
        f.write(json.dumps({"iteration": 9, "epoch": 1, "batch_id": 3, "loss": 42.0}) + "\n")
        f.write('{"iteration": 10, "epoch": 1, "ba')
    steps = load_run(run).steps
    assert steps.iteration.tolist() == list(range(1, 11))
    assert steps.loss[8] == 42.0 and math.isnan(steps.limit[8])
    assert load_run(run).name == "isgd"


def test_noise_caption_says_what_a_figure_cannot_show(tmp_path: Path):
    from isgd.reporting.plots import noise_caption

    losses = synthetic_losses(3, 8)
    sgd = write_run(tmp_path / "sgd", losses, optimizer="sgd")
    isgd = write_run(tmp_path / "isgd", losses, optimizer="isgd")
    runs = [load_run(sgd), load_run(isgd)]
    # ISGD acted and the curves differ: on time, separate runs under different load
    caption = noise_caption(runs, "time/train_seconds")
    assert "measured in 2 separate runs: machine load differs between them" in caption
    assert "not speed" in caption and "compare passes (accuracy_vs_passes.png)" in caption
    assert "\n" not in caption  # one line in summary.md
    assert noise_caption(runs, "passes") == ""
    # an ISGD run that never triggered did the computation of its base optimizer
    idle = write_run(tmp_path / "idle", losses, optimizer="sgd")
    summary = json.loads((idle / "summary.json").read_text())
    summary.update(optimizer="isgd", **{"isgd/triggers": 0})
    (idle / "summary.json").write_text(json.dumps(summary))
    pair = [load_run(sgd), load_run(idle)]
    caption = noise_caption(pair, "time/train_seconds")
    assert f"{pair[1].name}: ISGD never triggered" in caption
    assert f"identical accuracy at every evaluation: {pair[0].name} = {pair[1].name}" in caption
    assert "the same computation: differences in time are machine load, not speed" in caption


@pytest.fixture
def figures(monkeypatch) -> dict:
    """The figures ``isgd.reporting.plots`` saves, by file name, as they are saved."""
    from isgd.reporting import plots

    saved: dict = {}
    save = plots._save

    def capture(fig, path):
        saved[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return saved


@pytest.mark.slow
def test_accuracy_is_compared_on_passes_and_time_carries_its_caveat(tmp_path: Path, figures):
    """The demo's case: two runs timed one after the other, the second under more load. The
    passes figure comes first; the time figure says on top why it is no comparison of speed."""
    from isgd.reporting import plots

    sgd = write_run(tmp_path / "sgd", synthetic_losses(3, 20, seed=1), optimizer="sgd")
    loaded = dict(seconds_per_pass=0.03)  # same work per pass, twice the seconds
    isgd = write_run(tmp_path / "isgd", synthetic_losses(3, 20, seed=2), **loaded)
    paths = plot_runs([sgd, isgd], tmp_path / "figs")
    assert [p.name for p in paths[:2]] == ["accuracy_vs_passes.png", "accuracy_vs_time.png"]
    passes, time = figures["accuracy_vs_passes.png"], figures["accuracy_vs_time.png"]
    assert passes.axes[0].get_xlabel().startswith("forward+backward passes")
    assert passes.get_suptitle() == ""
    assert time.axes[0].get_xlabel().startswith("wall-clock training time (s")
    assert time.axes[0].get_title() == "Test accuracy vs wall-clock time (zoomed)"
    note = time.get_suptitle()
    assert note.startswith("wall-clock time, measured in 2 separate runs: machine load differs")
    assert "compare passes (accuracy_vs_passes.png)" in note
    assert plots.time_note([load_run(sgd)]) == ""  # one run: nothing to compare, no caveat


def test_a_lower_is_better_metric_is_plotted_and_tabled_under_its_name(tmp_path: Path, figures):
    """A run of a workload judged by bits per character (lower is better): the figures and the
    table name it, zoom on its low end and print it plain; two runs with the same evaluations
    are said to be identical in that metric."""
    import shutil

    from isgd.reporting import plots
    from isgd.reporting.report import runs_table
    from tests.experiments.test_records import write_run as write_workload_run

    a = write_workload_run(tmp_path / "a", "sgd", 0, metric="bits_per_char")
    b = write_workload_run(tmp_path / "b", "isgd", 1, metric="bits_per_char")
    plot_runs([a, b], tmp_path / "figs")
    left, right = figures["accuracy_vs_passes.png"].axes[:2]
    assert left.get_title() == "Test bits per char vs passes (zoomed)"
    assert left.get_ylabel() == "test bits per char, lower is better"
    assert right.get_title() == "Test loss vs passes"
    low, high = left.get_ylim()  # the best 3/4: from the lowest (1.2) to the 75th percentile
    assert low < 1.2 < high < 2.2
    twin = shutil.copytree(a, tmp_path / "c")  # the same computation again
    caption = plots.noise_caption(plots._as_runs([a, twin]), "passes")
    assert "identical bits per char at every evaluation: a = c" in caption
    table = runs_table([a, b])
    assert "| metric | final | best |" in table
    assert "| bits per char (lower is better) | 1.2 | 1.2 |" in table
    assert "| bits per char (lower is better) | 1.24 | 1.24 | 5 | 5 | 1.6: missed |" in table
