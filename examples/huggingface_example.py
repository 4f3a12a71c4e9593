"""ISGD in a Hugging Face Trainer: a tiny BERT built from a config (no download), gradient
accumulation, gradient clipping and a linear LR schedule, all the Trainer's own.

    python examples/huggingface_example.py [--out DIR] [--max-grad-norm 0.5] [--bf16]

The data are synthetic token sequences labelled by whether token 7 occurs, with a share of the
labels flipped so that some batches stay under-trained and ISGD has work to do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import isgd
from isgd.integrations.huggingface import ISGDTrainer

N, LENGTH, BATCH, ACCUMULATE = 128, 16, 8, 2  # 8 optimizer steps per epoch


class Sequences(Dataset):
    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (N, LENGTH), generator=g)
        self.labels = (self.ids == 7).any(1).long()
        flip = torch.rand(N, generator=g) < 0.15
        self.labels[flip] = 1 - self.labels[flip]

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": self.labels[i],
        }


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> ISGDTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hf-example"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-grad-norm", type=float, default=0.5)
    parser.add_argument("--sigma-factor", type=float, default=0.5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--window", type=int, default=None, help="default: steps per epoch")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    opt = isgd.ISGD(  # window=None: the Trainer's optimizer steps per epoch (8 here)
        model.parameters(), torch.optim.SGD, window=args.window,
        sigma_factor=args.sigma_factor, lr=0.05, momentum=0.9,
    )  # fmt: skip
    training = TrainingArguments(
        output_dir=str(args.out), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE, num_train_epochs=args.epochs,
        max_grad_norm=args.max_grad_norm, lr_scheduler_type="linear", learning_rate=0.05,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=args.bf16,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = ISGDTrainer(
        model=model, args=training, train_dataset=Sequences(), optimizers=(opt, None),
        callbacks=list(callbacks),
    )  # fmt: skip
    trainer.train()
    s = opt.stats
    print(f"{s.steps} steps, {s.triggers} triggers, {s.extra_iters} extra iterations")
    return trainer


if __name__ == "__main__":
    main()
