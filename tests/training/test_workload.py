"""Workloads: a user's model and data through ``isgd train --workload``, the checks that turn a
broken workload file into one line, and the built-in image workload as one of them."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from isgd.cli import main
from isgd.errors import ConfigError
from isgd.experiments import Metric, Workload
from isgd.training import runio
from isgd.training.config import TrainConfig, resolve_config
from isgd.training.lifecycle import train
from isgd.training.workload import WorkloadError, check_workload, load_workload

ROOT = Path(__file__).resolve().parents[2]
FORECAST = f"{ROOT / 'examples' / 'forecast_workload.py'}:workload"

# a classifier workload written as a user would: tensors, a small MLP, the defaults
CLASSIFIER = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from isgd.experiments import Workload

def make(n, g):
    x = torch.randn(n, 12, generator=g)
    return TensorDataset(x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long())

def workload(seed):
    g = torch.Generator().manual_seed(7)
    return Workload(model=nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)),
                    train=make(320, g), test=make(96, g))
"""


def write(tmp_path: Path, text: str, name: str = "wl.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def train_argv(spec: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--workload", spec, "--out", str(out), "--iters", "60", "--eval-every", "20",
        "--checkpoint-every", "30", "--batch-size", "32", "--threads", "1", "--no-progress",
        "--no-tensorboard", *extra,
    ]  # fmt: skip


def test_a_classifier_workload_trains_and_records_accuracy(tmp_path, capsys):
    spec = f"{write(tmp_path, CLASSIFIER)}:workload"
    argv = train_argv(spec, tmp_path / "run", "--lr", "0.1", "--target", "0.5", "--log-every", "20")
    assert main(argv) == 0
    progress = capsys.readouterr().err
    assert "samples/s" in progress and "img/s" not in progress  # a workload's samples
    summary = runio.read_json(tmp_path / "run" / "summary.json")
    assert summary["metric/name"] == "accuracy" and summary["metric/higher_is_better"]
    assert summary["final/test_metric"] == summary["final/test_accuracy"] > 0.5
    assert summary["target/iteration"] is not None  # reached at or above the target
    assert summary["workload"] == "wl:workload" and summary["dataset"] is None
    lines = list(runio.read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert [r["iteration"] for r in lines] == [0, 20, 40, 60]
    assert all(r["test/metric"] == r["test/accuracy"] for r in lines)
    provenance = runio.read_json(tmp_path / "run" / "provenance.json")
    digest = hashlib.sha256((tmp_path / "wl.py").read_bytes()).hexdigest()
    assert provenance["workload"]["sha256"] == digest
    config = (tmp_path / "run" / "config.toml").read_text()
    assert f'workload = "{tmp_path / "wl.py"}:workload"' in config  # absolute: resumable anywhere


def test_a_lower_is_better_metric_reaches_its_target_from_above(tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(FORECAST, out, "--lr", "0.05", "--target", "0.2")) == 0
    summary = runio.read_json(out / "summary.json")
    assert summary["metric/name"] == "mse" and summary["metric/higher_is_better"] is False
    assert "final/test_accuracy" not in summary and "test/accuracy" not in json.dumps(
        list(runio.read_jsonl(out / "metrics.jsonl"))
    )
    values = [r["test/metric"] for r in runio.read_jsonl(out / "metrics.jsonl")]
    first = next(r for r in runio.read_jsonl(out / "metrics.jsonl") if r["test/metric"] <= 0.2)
    assert values[0] > 0.2 and summary["target/iteration"] == first["iteration"]
    assert summary["best/test_metric"] == min(values)


def test_a_workload_run_resumes_bit_identically(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(train_argv(FORECAST, whole)) == 0
    assert main(train_argv(FORECAST, cut, "--iters", "30")) == 0  # a checkpoint at 30
    (cut / "summary.json").unlink()
    (cut / "model.pt").unlink()
    text = (cut / "config.toml").read_text().replace("iters = 30", "iters = 60")
    (cut / "config.toml").write_text(text)
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    assert (cut / "model.pt").read_bytes() == (whole / "model.pt").read_bytes()


def test_the_workload_object_api_and_its_checks(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    wl = Workload(nn.Linear(4, 2), data, data)
    config = TrainConfig(iters=16, budget=0.5, eval_every=8, batch_size=16, threads=1)
    config.tensorboard = False
    regression = _with(wl, train=TensorDataset(x, x))  # float targets, and cross-entropy
    with pytest.raises(WorkloadError, match=r"does not fit the loss \(output float32 \(2, 2\)"):
        train(config, tmp_path / "a", workload=regression)
    assert not (tmp_path / "a").exists()  # refused before anything was created
    summary = train(config, tmp_path / "b", workload=wl, progress=False)
    assert summary["metric/name"] == "accuracy"
    assert summary["iterations"] == 8  # the budget: half of the 16 configured iterations


def _with(workload: Workload, **changes) -> Workload:
    from dataclasses import replace

    return replace(workload, **changes)


def test_the_seed_is_set_before_the_workload_is_built():
    a, b = load_workload(FORECAST, 3), load_workload(FORECAST, 3)
    c = load_workload(FORECAST, 4)
    wa, wb, wc = (next(w.model.parameters()) for w in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_preset_and_image_keys_are_refused_with_a_workload():
    with pytest.raises(ConfigError, match="preset lenet-mnist names its own"):
        resolve_config("lenet-mnist", None, {"workload": FORECAST})
    with pytest.raises(ConfigError, match="drop dataset, augment"):
        resolve_config(None, None, {"workload": FORECAST, "dataset": "cifar10", "augment": True})


# ---------------------------------------------------------------------- broken workload files
BROKEN = {
    "syntax": ("def workload(seed):\n    return (\n", "wl.py:2: syntax error"),
    "import_raises": ("raise RuntimeError('no GPU here')\n", "raised RuntimeError: no GPU here"),
    "no_function": (
        "def other(seed):\n    pass\n",
        "has no function 'workload' (it defines: other)",
    ),
    "raises": (
        "def workload(seed):\n    return 1 / 0\n",
        "workload(seed=0) raised ZeroDivisionError: division by zero (at wl.py:2)",
    ),
    "wrong_type": (
        "def workload(seed):\n    return {'model': None}\n",
        "returned dict, not isgd.experiments.Workload",
    ),
    "not_a_module": (
        "from isgd.experiments import Workload\nfrom torch.utils.data import TensorDataset\n"
        "import torch\ndef workload(seed):\n"
        "    d = TensorDataset(torch.zeros(4, 2), torch.zeros(4).long())\n"
        "    return Workload(model='lenet', train=d, test=d)\n",
        "model is a str, not an nn.Module",
    ),
    "iterable": (
        "from isgd.experiments import Workload\nfrom torch.utils.data import IterableDataset\n"
        "import torch\nclass S(IterableDataset):\n    def __iter__(self):\n        yield 1\n"
        "def workload(seed):\n    return Workload(torch.nn.Linear(2, 2), S(), S())\n",
        "train is a S, not a map-style Dataset",
    ),
    "not_a_pair": (
        "from isgd.experiments import Workload\nfrom torch.utils.data import TensorDataset\n"
        "import torch\ndef workload(seed):\n    d = TensorDataset(torch.zeros(4, 2))\n"
        "    return Workload(torch.nn.Linear(2, 2), d, d)\n",
        "train[0] is a tuple of 1, not an (input, target) pair",
    ),
    "output_does_not_fit_the_loss": (
        "from isgd.experiments import Workload\nfrom torch.utils.data import TensorDataset\n"
        "import torch\ndef workload(seed):\n"
        "    d = TensorDataset(torch.zeros(40, 2), torch.zeros(40, 3))\n"
        "    return Workload(torch.nn.Linear(2, 5), d, d, loss=torch.nn.functional.mse_loss,"
        " metric='loss')\n",
        "the model's output does not fit the loss (output float32 (2, 5), target float32 (2, 3))",
    ),
    "loss_broadcasts": (  # the classic silent bug: N×1 outputs against N targets
        "from isgd.experiments import Workload\nfrom torch.utils.data import TensorDataset\n"
        "import torch\ndef workload(seed):\n"
        "    d = TensorDataset(torch.zeros(40, 2), torch.zeros(40))\n"
        "    return Workload(torch.nn.Linear(2, 1), d, d, loss=torch.nn.functional.mse_loss,"
        " metric='loss')\n",
        "the loss warns (output float32 (2, 1), target float32 (2,)): UserWarning: Using a target",
    ),
    "one_class": (
        "from isgd.experiments import Workload\nfrom torch.utils.data import TensorDataset\n"
        "import torch\ndef workload(seed):\n"
        "    d = TensorDataset(torch.randn(40, 2), torch.ones(40).long())\n"
        "    return Workload(torch.nn.Linear(2, 3), d, d)\n",
        "every train label is 1: one class leaves nothing to learn",
    ),
    "accuracy_of_a_regression": (
        "from isgd.experiments import Workload\nfrom torch.utils.data import TensorDataset\n"
        "import torch\ndef workload(seed):\n"
        "    d = TensorDataset(torch.randn(40, 2), torch.randn(40, 1))\n"
        "    return Workload(torch.nn.Linear(2, 1), d, d, loss=torch.nn.functional.mse_loss)\n",
        "metric 'accuracy' needs integer class labels",
    ),
    "bad_metric": (
        "from isgd.experiments import Workload\nfrom torch.utils.data import TensorDataset\n"
        "import torch\ndef workload(seed):\n"
        "    d = TensorDataset(torch.randn(40, 2), torch.randn(40, 1))\n"
        "    return Workload(torch.nn.Linear(2, 1), d, d, torch.nn.functional.mse_loss, 'mse')\n",
        "metric 'mse' is not 'accuracy', 'loss' or an isgd.experiments.Metric",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_workload_file_is_one_line_and_exit_2(case, tmp_path, capsys):
    text, expected = BROKEN[case]
    spec = f"{write(tmp_path, text)}:workload"
    rc = main(train_argv(spec, tmp_path / "run"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("isgd: error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"workload {tmp_path / 'wl.py'}:workload" in errors[0], errors[0]  # names the file
    assert expected in errors[0], errors[0]
    assert not (tmp_path / "run").exists()  # nothing created


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("nofile.py:workload", "nofile.py:workload: no such file /"),
        ("no_such_package.mod:workload", "no module named 'no_such_package'"),
        ("examples/forecast_workload.py", "expected FILE.py:FUNC or package.module:FUNC"),
    ],
)
def test_a_workload_spec_that_names_nothing_is_one_line(spec, expected, tmp_path, capsys):
    rc = main(train_argv(spec, tmp_path / "run"))
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err, err


def test_a_metric_object_is_checked_and_a_module_spec_loads(tmp_path, monkeypatch):
    write(tmp_path, CLASSIFIER, "user_workloads.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    wl = load_workload("user_workloads:workload", 0)
    assert wl.name == "user_workloads:workload" and wl.num_classes == 3
    bad = Metric("norm", lambda out, y: out.norm(dim=1), higher_is_better=False)  # not a mean
    with pytest.raises(WorkloadError, match=r"metric norm gives float32 \(2,\), not one number"):
        check_workload(_with(wl, metric=bad), "mine")
    assert F.cross_entropy is wl.loss


@pytest.mark.slow
def test_a_workload_trains_data_parallel_as_in_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["--iters", "300", "--eval-every", "100", "--lr", "0.05"]
    assert main(train_argv(FORECAST, one, *argv)) == 0
    assert main([*train_argv(FORECAST, two, *argv), "--nproc", "2"]) == 0
    steps = [list(runio.read_jsonl(d / "steps.jsonl")) for d in (one, two)]
    decisions = [[(s["triggered"], s["extra_iters"]) for s in run] for run in steps]
    assert decisions[0] == decisions[1] and sum(t for t, _ in decisions[0]) >= 1
    a, b = (torch.load(d / "model.pt") for d in (one, two))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert runio.read_json(two / "summary.json")["distributed/batch_sizes"] == [16, 16]


def test_a_validation_split_is_watched_and_the_test_split_read_once_at_the_end(tmp_path):
    import importlib.util

    out = tmp_path / "run"
    assert main(train_argv(FORECAST, out, "--validation", "500", "--target", "0.2")) == 0
    lines = list(runio.read_jsonl(out / "metrics.jsonl"))
    assert all("val/metric" in r and "test/metric" not in r for r in lines)
    summary = runio.read_json(out / "summary.json")
    assert summary["evaluated/split"] == "validation"
    assert summary["final/val_metric"] == lines[-1]["val/metric"]
    first = next(r for r in lines if r["val/metric"] <= 0.2)  # the target on validation data
    assert summary["target/iteration"] == first["iteration"]
    # the test figure is model.pt on the test split, evaluated independently here
    spec = importlib.util.spec_from_file_location(
        "forecast", ROOT / "examples/forecast_workload.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    workload = module.workload(0)
    workload.model.load_state_dict(torch.load(out / "model.pt"))
    x, y = workload.test.tensors
    with torch.no_grad():
        mse = float(F.mse_loss(workload.model(x), y))
    assert summary["final/test_metric"] == pytest.approx(mse, rel=1e-5)
    # the training set lost the held-out samples: 4032 - 500 windows, 32 a batch
    assert summary["n_batches_per_epoch"] == (4032 - 500) // 32
