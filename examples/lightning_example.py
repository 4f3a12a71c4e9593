"""ISGD in a Lightning Trainer: automatic optimisation, fp32 or bf16, one process or DDP.

    python examples/lightning_example.py                                   # one process, fp32
    python examples/lightning_example.py --precision bf16-mixed
    python examples/lightning_example.py --devices 2 --strategy ddp        # 2 CPU processes, gloo

The data are synthetic (images labelled by a fixed random teacher, one batch with noise labels, so
ISGD has an under-trained batch to work on); batches come in ISGD's fixed cycle, split across ranks
by ``DistributedFixedCycleBatchSampler`` under DDP. ``--out DIR`` writes each rank's decisions and
a digest of its final weights (``rank<r>.json``) — the test suite reads them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from synthetic import BATCH, N, synthetic_data
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import isgd
from isgd.integrations.lightning import ISGDCallback


class Classifier(pl.LightningModule):
    def __init__(self, n_batches: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.n_batches = n_batches

    def train_dataloader(self) -> DataLoader:
        if self.trainer.world_size > 1:  # this rank's slice of every global fixed batch
            sampler = isgd.DistributedFixedCycleBatchSampler(N, BATCH)
        else:
            sampler = isgd.FixedCycleBatchSampler(N, BATCH)
        return DataLoader(synthetic_data(), batch_sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # ISGDCallback keeps the regular pass's value
        return loss

    def configure_optimizers(self):
        opt = isgd.ISGD(
            self.parameters(), torch.optim.SGD, window=self.n_batches, sigma_factor=1.0,
            lr=0.05, momentum=0.9,
        )  # fmt: skip
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Record(pl.Callback):
    """Every step's decision, for the comparison across ranks."""

    def __init__(self) -> None:
        self.decisions: list[list] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = trainer.optimizers[0].stats.last
        self.decisions.append([last.triggered, last.extra_iters, last.loss])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("runs/lightning-example"))
    args = parser.parse_args(argv)

    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=args.strategy,
        precision=args.precision, max_epochs=args.epochs, callbacks=[ISGDCallback(), record],
        logger=CSVLogger(args.out, name="logs"), log_every_n_steps=1,
        use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    model = Classifier(n_batches=N // BATCH)
    trainer.fit(model)

    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    result = {
        "rank": trainer.global_rank,
        "decisions": record.decisions,
        "weights_sha256": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        "stats": trainer.optimizers[0].stats.state_dict(),
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "metrics_csv": str(Path(trainer.logger.log_dir) / "metrics.csv"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if trainer.global_rank == 0:
        s = result["stats"]
        print(f"{s['steps']} steps, {s['triggers']} triggers, {s['extra_iters']} extra iterations")
    return result


if __name__ == "__main__":
    main()
