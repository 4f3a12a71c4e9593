"""ISGD under Lightning's ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``),
for ``tests/integrations/test_lightning.py``; run by ``torchrun --nproc-per-node 2``.

Two fits of the Lightning example's classifier on CPU (gloo), each rank its slice of every batch:
one of ``SAVE_AT`` steps, saved with ``trainer.save_checkpoint`` (Lightning writes a distributed
checkpoint through ``get_optimizer_state_dict``), then its resumption to ``STEPS``
(``ckpt_path=``). Each rank writes the decisions, ``n_w``, the whole weights, and ISGD's state
(counters, chart, momentum buffers) at the end of the first fit and as the second one starts.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import lightning_example

from isgd.integrations.lightning import ISGDCallback

STEPS, SAVE_AT = 60, 36  # the example's epochs have 12 steps


def isgd_state(trainer: pl.Trainer) -> dict:
    opt = trainer.optimizers[0]
    buffers = [opt.state[p]["momentum_buffer"].full_tensor() for p in opt.param_groups[0]["params"]]
    return {
        "stats": opt.stats.state_dict(),
        "chart": opt.chart.losses(),
        "momentum": torch.cat([b.flatten() for b in buffers]).tolist(),
    }


class Restored(pl.Callback):
    """ISGD's state as a resumed fit starts (after Lightning restored the checkpoint)."""

    state: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            self.state = isgd_state(trainer)


class Sharded(lightning_example.Classifier):
    def configure_optimizers(self):
        return lightning_example.isgd.ISGD(
            self.parameters(), window=self.n_batches, sigma_factor=0.5, lr=0.05, momentum=0.9
        )

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def fit(out: Path, max_steps: int, ckpt_path: Path | None = None) -> tuple[pl.Trainer, dict]:
    record, restored = lightning_example.Record(), Restored()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=max_steps,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=[ISGDCallback(), record, restored], logger=False, use_distributed_sampler=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )  # fmt: skip
    model = Sharded(n_batches=lightning_example.N // lightning_example.BATCH)
    trainer.fit(model, ckpt_path=ckpt_path)
    opt = trainer.optimizers[0]
    weights = torch.cat([p.full_tensor().flatten() for p in model.parameters()])
    return trainer, {
        "decisions": record.decisions,
        "n_w": opt.n_w,
        "n_weights": sum(p.numel() for p in model.parameters()),
        "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "stats": opt.stats.state_dict(),
        "weights": weights.tolist(),
        "end": isgd_state(trainer),
        "restored": restored.state,
    }


def main() -> None:
    warnings.simplefilter("ignore")  # Lightning's and torch's notes on the CPU run
    out = Path(sys.argv[1])
    trainer, first = fit(out, SAVE_AT)
    trainer.save_checkpoint(out / "ckpt")
    _, resumed = fit(out, STEPS, ckpt_path=out / "ckpt")
    result = {"first": first, "resumed": resumed}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
