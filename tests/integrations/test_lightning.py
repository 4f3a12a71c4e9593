"""ISGD in a real Lightning Trainer (CPU): fp32 and bf16 on one process, DDP on two (gloo),
16-mixed with a CPU GradScaler (automatic and manual optimisation), the window taken from the
Trainer, FSDP2 under ModelParallelStrategy on two, and the set-ups ISGD refuses at setup."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

# the integrations extra (make test installs it); without it, skip rather than fail to collect
pytest.importorskip("lightning", reason="needs the integrations extra (.[integrations])")
import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy

from isgd.integrations.lightning import ISGDCallback, ISGDMixedPrecision

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_example.py"
sys.path.insert(0, str(EXAMPLE.parent))
import lightning_example  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses and frameworks: make test, not test-fast


def read_metrics(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_automatic_optimisation_logs_the_regular_loss_and_isgd_statistics(tmp_path, precision):
    result = lightning_example.main(["--out", str(tmp_path), "--precision", precision])
    stats = result["stats"]
    assert stats["steps"] == 72 and stats["triggers"] > 0 and stats["extra_iters"] > 0
    assert result["lr"] == pytest.approx(0.05 * 0.5)  # StepLR(50) stepped once per regular step
    rows = [r for r in read_metrics(result["metrics_csv"]) if r.get("isgd/loss")]
    assert len(rows) == 72
    # the names every loop logs (ISGDStats.metrics()), cumulative like the trainer's and HF's
    triggers = [float(r["isgd/triggers"]) for r in rows]
    triggered = [r for r, before, now in zip(rows, [0.0, *triggers], triggers) if now > before]
    assert len(triggered) == stats["triggers"] == triggers[-1]
    assert all(float(r["isgd/limit"]) < float(r["isgd/loss"]) for r in triggered)
    extra = [float(r["isgd/extra_iters"]) for r in rows]
    assert extra == sorted(extra) and extra[-1] == stats["extra_iters"]
    # the module's own train_loss is the regular pass's, not the last extra pass's
    for r in rows:
        assert math.isclose(float(r["train_loss"]), float(r["isgd/loss"]), rel_tol=1e-6)


def test_ddp_two_processes_take_the_same_decisions(tmp_path):
    argv = [sys.executable, str(EXAMPLE), "--devices", "2", "--strategy", "ddp"]
    subprocess.run(
        [*argv, "--out", str(tmp_path)], check=True, timeout=300, capture_output=True, cwd=tmp_path
    )
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["stats"]["triggers"] > 0 and r0["stats"]["extra_iters"] > 0
    assert r0["decisions"] == r1["decisions"]
    assert r0["weights_sha256"] == r1["weights_sha256"]


def fit(tmp_path, module=None, max_steps=2, callbacks=(), **trainer_kwargs) -> pl.Trainer:
    module = module or lightning_example.Classifier(n_batches=12)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=[ISGDCallback(), *callbacks],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module)
    return trainer


def cpu_16_mixed() -> MixedPrecision:
    """precision="16-mixed" as Lightning builds it on CUDA (a GradScaler), on the CPU."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))


class Manual(lightning_example.Classifier):
    """Manual optimisation: the closure back-propagates through manual_backward (scaled)."""

    def __init__(self, n_batches: int) -> None:
        super().__init__(n_batches)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            return loss

        return opt.step(closure)

    def configure_optimizers(self):
        return lightning_example.isgd.ISGD(
            self.parameters(), window=self.n_batches, sigma_factor=1.0, lr=0.05, momentum=0.9
        )


@pytest.mark.parametrize("module", ["automatic", "manual"])
def test_16_mixed_runs_isgd_to_max_steps(tmp_path, module):
    steps = 5 * 12  # 5 epochs of the example's 12 fixed batches
    classes = {"automatic": lightning_example.Classifier, "manual": Manual}
    kwargs = {"gradient_clip_val": 0.5} if module == "automatic" else {}  # clipping, unscaled
    trainer = fit(tmp_path, classes[module](n_batches=12), max_steps=steps,
                  plugins=[cpu_16_mixed()], **kwargs)  # fmt: skip
    plugin = trainer.precision_plugin
    assert isinstance(plugin, ISGDMixedPrecision)  # installed by the callback at setup
    stats = trainer.optimizers[0].stats
    assert trainer.global_step == steps == stats.steps
    assert stats.triggers > 0 and stats.extra_iters > 0
    assert plugin.scaler._scale is not None  # the scaler scaled every backward


def test_another_grad_scaler_plugin_is_refused_naming_the_route(tmp_path):
    class Custom(MixedPrecision):
        pass

    plugin = Custom("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    route = r"plugins=\[isgd.integrations.lightning.ISGDMixedPrecision\('16-mixed', 'cuda'\)\]"
    with pytest.raises(MisconfigurationException, match=route):
        fit(tmp_path, plugins=[plugin])


class NoWindow(lightning_example.Classifier):
    def configure_optimizers(self):
        return lightning_example.isgd.ISGD(self.parameters(), window=None, lr=0.05)


def test_window_none_is_the_epochs_batches(tmp_path):
    trainer = fit(tmp_path, NoWindow(n_batches=0), max_steps=30)
    assert trainer.num_training_batches == 12 and trainer.optimizers[0].window == 12


def test_window_the_run_cannot_fill_is_warned(tmp_path):
    with pytest.warns(UserWarning, match=r"window is 12 but this run has 5 optimizer steps"):
        fit(tmp_path, max_steps=5)


def test_accumulate_grad_batches_is_refused_at_fit_start(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"accumulate_grad_batches=2"):
        fit(tmp_path, accumulate_grad_batches=2)


def test_fsdp2_under_model_parallel_strategy_two_processes(tmp_path):
    """FSDP2 (fully_shard in configure_model, DTensor parameters) on 2 gloo ranks: ISGD triggers,
    both ranks decide alike, n_w is the whole model's, and Lightning's distributed checkpoint
    brings ISGD's counters, chart and momentum buffers back (lightning_fsdp2.py)."""
    script = Path(__file__).with_name("lightning_fsdp2.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    subprocess.run([*argv, str(script), str(tmp_path)], check=True, timeout=300,
                   capture_output=True, cwd=tmp_path, env=env)  # fmt: skip
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # decisions, whole weights, ISGD's state: the same on both ranks
    first, resumed = r0["first"], r0["resumed"]
    assert first["sharded"] and first["n_w"] == 64 * 32 + 32 + 32 * 10 + 10  # the whole model
    assert first["stats"]["triggers"] > 0 and first["stats"]["extra_iters"] > 0
    assert resumed["restored"] == first["end"]  # counters, chart, momentum: as saved
    assert resumed["stats"]["triggers"] > first["stats"]["triggers"]  # ISGD ran on after it


def test_fsdp1_strategy_is_refused_at_setup_in_one_line():
    """Lightning builds strategy="fsdp" on GPUs only (on the CPU its own error comes first): the
    callback's refusal, called as Lightning calls it."""
    trainer = types.SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match=r"ModelParallelStrategy") as info:
        ISGDCallback().setup(trainer, lightning_example.Classifier(n_batches=12), "fit")  # type: ignore[arg-type]
    assert str(info.value).startswith("ISGD does not run under Lightning's FSDPStrategy")
    assert "\n" not in str(info.value)
