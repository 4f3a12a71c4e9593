"""The drop-in conversion of the PyTorch MNIST example shown in docs/integrations.md: the diff's
old side is pytorch/examples' mnist/main.py, its new side runs (ISGD over Adadelta, StepLR) and
triggers, and it replaces six lines by three, re-indenting none."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch
from torch.nn import functional as F

import isgd

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"

# pytorch/examples, mnist/main.py: the training loop and the optimizer line, verbatim
CANONICAL = """\
def train(args, model, device, train_loader, optimizer, epoch):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0:
            print('Train Epoch: {} [{}/{} ({:.0f}%)]\\tLoss: {:.6f}'.format(
                epoch, batch_idx * len(data), len(train_loader.dataset),
                100. * batch_idx / len(train_loader), loss.item()))
            if args.dry_run:
                break
"""
OPTIMIZER = "    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)\n"


def sides() -> tuple[list[str], list[str]]:
    block = re.search(r"```diff\n--- mnist/main.py\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/integrations.md: the MNIST diff block"
    old, new = [], []
    for line in block.group(1).splitlines(keepends=True):
        if line.startswith(("+++", "@@")):
            continue
        tag, text = line[:1], line[1:]
        if tag in " -":
            old.append(text)
        if tag in " +":
            new.append(text)
    return old, new


def test_the_old_side_is_the_pytorch_example():
    old, _ = sides()
    text = "".join(old)
    assert CANONICAL in text and OPTIMIZER in text


def test_six_lines_go_three_come_and_nothing_is_re_indented():
    old, new = sides()
    added = [line for line in new if line not in old]
    removed = [line for line in old if line not in new]
    # new: import isgd, the step with isgd.loss_closure, the optimizer line
    assert len(added) == 3 and len(removed) == 6
    assert not {line.strip() for line in added} & {line.strip() for line in old}


def test_the_converted_loop_runs_and_triggers():
    _, new = sides()
    text = "".join(new)
    train_src = text[text.index("def train(") : text.index("            if args.dry_run")]
    train_src += "            pass\n"
    line = next(n for n in new if "optimizer = isgd.ISGD(" in n).strip()
    scope: dict = {"F": F, "isgd": isgd, "optim": torch.optim, "print": lambda *a: None}
    exec(train_src, scope)  # the doc's own code

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LogSoftmax(dim=1))
    x = torch.randn(256, 8)
    y = (x @ torch.randn(8, 4)).argmax(1)  # labels from a fixed teacher: learnable
    y[:8] = torch.randint(0, 4, (8,))  # but one batch of noise labels: an under-trained batch
    data = torch.utils.data.TensorDataset(x, y)
    train_loader = torch.utils.data.DataLoader(data, batch_size=8)
    args = types.SimpleNamespace(lr=1.0, log_interval=10, dry_run=False, gamma=0.95)
    scope.update(model=model, args=args, train_loader=train_loader)
    exec(line, scope)
    optimizer = scope["optimizer"]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)
    assert optimizer.window == len(train_loader) == 32
    for epoch in range(1, 9):
        scope["train"](args, model, "cpu", train_loader, optimizer, epoch)
        scheduler.step()
    assert optimizer.stats.steps == 256 and optimizer.stats.triggers > 0
