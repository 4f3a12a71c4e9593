"""``isgd`` end to end on a tiny IDX data set (no fetch): train, resume, plot and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from isgd.cli import main
from isgd.data import default_data_dir
from isgd.training import runio
from tests.conftest import TINY, tiny_train_argv

N_TRAIN, BATCH, NOISY_BATCH = TINY["n_train"], TINY["batch"], TINY["noisy_batch"]


@pytest.fixture(scope="module")
def idx_dir(tiny_idx_dir) -> Path:
    return tiny_idx_dir


def base_args(idx_dir: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_argv(
        idx_dir,
        out,
        *("--sigma-factor", "1.5", "--iters", "150", "--eval-every", "30"),
        *("--checkpoint-every", "40", *extra),
    )


@pytest.fixture(scope="module")
def isgd_run(idx_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "isgd"
    assert main(base_args(idx_dir, out, "--optimizer", "isgd")) == 0
    return out


def test_train_writes_a_complete_run_directory(isgd_run):
    for name in (
        "config.toml",
        "provenance.json",
        "metrics.jsonl",
        "steps.jsonl",
        "summary.json",
        "model.pt",
    ):
        assert (isgd_run / name).is_file(), name
    summary = json.loads((isgd_run / "summary.json").read_text())
    assert summary["iterations"] == 150 and summary["n_batches_per_epoch"] == N_TRAIN // BATCH
    assert summary["isgd/triggers"] > 0 and summary["passes"] > 150
    metrics = [runio.loads(line) for line in (isgd_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 30, 60, 90, 120, 150]
    assert metrics[-1]["passes"] == summary["passes"]
    assert all(m["time/train_seconds"] >= 0 for m in metrics)
    steps = [runio.loads(line) for line in (isgd_run / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 150 and steps[-1]["passes"] == summary["passes"]
    assert any(s["triggered"] for s in steps)
    assert all(s["limit"] is None for s in steps[: N_TRAIN // BATCH])
    assert {s["batch_id"] for s in steps if s["triggered"]} >= {NOISY_BATCH}
    weights = torch.load(isgd_run / "model.pt", weights_only=True)
    assert isinstance(weights, dict) and all(torch.is_tensor(v) for v in weights.values())
    assert sorted((isgd_run / "checkpoints").glob("ckpt-*.pt"))[-1].name == "ckpt-00000120.pt"


def test_config_file_round_trip_repeats_the_run(isgd_run, tmp_path, idx_dir):
    out = tmp_path / "again"
    rc = main(
        ["train", "--config", str(isgd_run / "config.toml"), "--out", str(out), "--no-progress"]
    )
    assert rc == 0
    assert (out / "model.pt").read_bytes() == (isgd_run / "model.pt").read_bytes()


@pytest.mark.parametrize("checkpoint_kept", ["ckpt-00000080.pt", "ckpt-00000120.pt"])
@pytest.mark.numerics
def test_resume_ends_with_the_same_model(isgd_run, tmp_path, checkpoint_kept):
    crashed = tmp_path / "crashed"
    shutil.copytree(isgd_run, crashed)
    for name in ("summary.json", "model.pt"):
        (crashed / name).unlink()
    (crashed / "checkpoints" / "ckpt-00000120.pt").rename(crashed / "checkpoints" / "keep.pt")
    if checkpoint_kept == "ckpt-00000120.pt":
        (crashed / "checkpoints" / "keep.pt").rename(crashed / "checkpoints" / checkpoint_kept)
    assert main(["train", "--resume", str(crashed), "--no-progress"]) == 0
    assert (crashed / "model.pt").read_bytes() == (isgd_run / "model.pt").read_bytes()
    original = (isgd_run / "steps.jsonl").read_text().splitlines()
    resumed = (crashed / "steps.jsonl").read_text().splitlines()
    assert resumed == original  # same losses, limits and decisions at every step
    a = json.loads((isgd_run / "summary.json").read_text())
    b = json.loads((crashed / "summary.json").read_text())
    assert {k: v for k, v in a.items() if "seconds" not in k and "per_second" not in k} == {
        k: v for k, v in b.items() if "seconds" not in k and "per_second" not in k
    }


def test_sgd_and_isgd_share_initialisation_and_batches(idx_dir, tmp_path, isgd_run):
    out = tmp_path / "sgd"
    assert main(base_args(idx_dir, out, "--optimizer", "sgd", "--iters", "20")) == 0
    sgd_steps = [runio.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    isgd_steps = [runio.loads(x) for x in (isgd_run / "steps.jsonl").read_text().splitlines()]
    # no trigger is possible in the first epoch, so the first 15 steps coincide exactly
    assert [s["loss"] for s in sgd_steps[:15]] == [s["loss"] for s in isgd_steps[:15]]
    assert sgd_steps[-1]["passes"] == 20


def test_plot_writes_figures(isgd_run, tmp_path):
    out = tmp_path / "plots"
    assert main(["plot", str(isgd_run), "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 4
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def _bad(idx_dir: Path, tmp: Path) -> list[tuple[list[str], str]]:
    cfg_unknown = tmp / "unknown.toml"
    cfg_unknown.write_text('optimizer = "isgd"\nlearning_rate = 0.1\n')
    cfg_type = tmp / "type.toml"
    cfg_type.write_text('iters = "many"\n')
    cfg_broken = tmp / "broken.toml"
    cfg_broken.write_text("iters = = 3\n")
    existing = tmp / "existing"
    existing.mkdir()
    (existing / "file").write_text("keep me")
    out = str(tmp / "new")
    return [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--iters", "ten"], "argument --iters: invalid int value: 'ten'"),
        (["train", "--lr", "-1", "--out", out], "invalid lr: -1.0"),
        (["train", "--optimizer", "lbfgs", "--out", out], "invalid optimizer: 'lbfgs'"),
        (["train", "--max-extra-iters", "-2", "--out", out], "invalid max_extra_iters: -2"),
        (["train", "--sigma-factor", "0", "--out", out], "invalid sigma_factor: 0.0"),
        (["train", "--preset", "imagenet"], "argument --preset: invalid choice: 'imagenet'"),
        (["train", "--config", str(cfg_unknown), "--out", out], "unknown config key in"),
        (["train", "--config", str(cfg_type), "--out", out], "invalid iters: 'many'"),
        (["train", "--config", str(cfg_broken), "--out", out], "is not valid TOML"),
        (["train", "--config", str(tmp / "none.toml"), "--out", out], "config file not found"),
        (["train", "--dataset", "svhn", "--out", out], "invalid dataset: 'svhn'"),
        (
            ["train", "--dataset", "imagenet", "--data-dir", str(tmp / "none"), "--out", out],
            "ImageNet not found in",
        ),
        (["train", "--dataset", f"packed:{tmp / 'nowhere'}", "--out", out], "no meta.json"),
        (["train", "--crop-size", "-1", "--out", out], "invalid crop_size: -1"),
        (["train", "--window", "1", "--out", out], "invalid window: 1"),
        (
            ["train", "--dataset", f"idx:{idx_dir}", "--crop-size", "9", "--out", out],
            "invalid crop_size: 9 (the idx:",
        ),
        (
            ["train", "--dataset", f"idx:{tmp / 'nowhere'}", "--out", out],
            f"missing IDX files in {tmp / 'nowhere'}: train-images-idx3-ubyte, ",
        ),
        (
            ["train", "--dataset", f"idx:{idx_dir}", "--model", "vgg", "--out", out],
            "invalid model: 'vgg'",
        ),
        (["train", "--out", str(existing)], "already exists and is not empty"),
        (["train", "--resume", str(tmp / "nothing")], "is not a run directory"),
        (["train", "--resume", str(existing), "--lr", "0.1"], "--resume continues the saved"),
        (["data", "fetch", "imagenet"], "argument name: invalid choice: 'imagenet' (choose from"),
        (["plot", str(existing)], f"{existing}: not a run directory (no metrics.jsonl)"),
        (["plot", str(tmp / "nothing")], f"{tmp / 'nothing'}: not a directory"),
    ]


def test_bad_input_gives_one_line_and_exit_code_2(idx_dir, tmp_path, capsys):
    for argv, expected in _bad(idx_dir, tmp_path):
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, argv
        errors = [line for line in err if line.startswith("isgd: error: ")]
        assert len(errors) == 1, (argv, err)
        assert expected in errors[0], (argv, errors[0])
        assert not any("Traceback" in line for line in err)
    assert (tmp_path / "existing" / "file").read_text() == "keep me"
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.mnist
def test_real_mnist_lenet(tmp_path):
    if not (default_data_dir() / "mnist" / "train-images-idx3-ubyte").exists():
        pytest.skip("real MNIST is not in the data directory (isgd data fetch mnist)")
    out = tmp_path / "mnist"
    rc = main(
        [
            "train",
            "--preset",
            "lenet-mnist",
            "--iters",
            "200",
            "--eval-every",
            "200",
            "--out",
            str(out),
            "--no-progress",
            "--no-tensorboard",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final/test_accuracy"] > 0.90


@pytest.mark.parametrize("optimizer", ["sgd", "isgd"])
def test_window_sets_the_charts_length(idx_dir, tmp_path, optimizer):
    """``--window W`` (a variant): the limit is mean + k·σ of the last W regular losses, from
    step W on, for the acting chart (ISGD) and the monitoring one (SGD) alike."""
    out, window, k = tmp_path / optimizer, 4, 1.5
    assert main(base_args(idx_dir, out, "--optimizer", optimizer, "--window", str(window))) == 0
    steps = [runio.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert all(s["limit"] is None for s in steps[:window])
    for t in range(window, len(steps)):
        last = torch.tensor([s["loss"] for s in steps[t - window : t]], dtype=torch.float64)
        expected = last.mean() + k * last.std(unbiased=False)
        assert steps[t]["limit"] == pytest.approx(expected.item(), rel=1e-6)
    if optimizer == "isgd":
        assert sum(s["triggered"] for s in steps) > 0


def test_per_batch_preparation_trains_the_same_model(idx_dir, tmp_path, isgd_run, monkeypatch):
    """A set too large to normalise up front (ImageNet) is prepared batch by batch: the same
    numbers, so the same model, as the whole-set path."""
    import isgd.training.data_setup

    monkeypatch.setattr(isgd.training.data_setup, "PREPARE_ONCE_MAX_BYTES", 0)
    out = tmp_path / "per-batch"
    assert main(base_args(idx_dir, out, "--optimizer", "isgd")) == 0
    assert (out / "model.pt").read_bytes() == (isgd_run / "model.pt").read_bytes()
    assert (out / "steps.jsonl").read_text() == (isgd_run / "steps.jsonl").read_text()


def test_lr_schedule_advances_once_per_regular_step_with_triggers(idx_dir, tmp_path):
    """Extra iterations are not steps of the schedule: the lr logged at each evaluation is the
    schedule's value at that regular iteration (inv: it changes at every iteration)."""
    out = tmp_path / "inv"
    schedule = ("--lr-policy", "inv", "--gamma", "0.01", "--power", "0.75")
    assert main(base_args(idx_dir, out, "--optimizer", "isgd", *schedule)) == 0
    records = [runio.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["isgd/extra_iters"] > 0 and last["passes"] > last["iteration"]
    for r in records:
        t = r["iteration"]
        assert r["lr"] == pytest.approx(0.05 * (1 + 0.01 * t) ** -0.75, rel=1e-12), t


def test_version_and_help_for_every_training_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("isgd ")
    from isgd.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    for action in train._actions:
        if action.option_strings and action.dest != "help":
            words = (action.help or "").replace("(default", "").strip(" )")
            assert len(words.split()) >= 3, f"{action.option_strings[0]} has no help text"


def test_run_files_get_the_mode_open_would_give_them(isgd_run):
    import os

    umask = os.umask(0)
    os.umask(umask)
    modes = {
        p.relative_to(isgd_run): p.stat().st_mode & 0o777
        for p in isgd_run.rglob("*")
        if p.is_file() and "tb" not in p.parts
    }
    assert set(modes.values()) == {0o666 & ~umask}, modes
