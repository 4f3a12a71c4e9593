"""``isgd plot``: figures and a table from run directories."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("isgd")


def add_parser(commands: Any) -> None:
    plot = commands.add_parser("plot", help="figures from one or more run directories")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", metavar="DIR", help="default: the first run directory's plots/")


def run(args: argparse.Namespace) -> int:
    from isgd.reporting.plots import load_run, noise_caption, plot_runs
    from isgd.reporting.report import runs_table
    from isgd.training.runio import atomic_write_text

    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else runs[0] / "plots"
    files = plot_runs(runs, out)
    table = runs_table(runs)
    caption = noise_caption([load_run(r) for r in runs], "time/train_seconds")
    if caption:
        table += "\n" + "".join(f"- {line}\n" for line in caption.splitlines())
    atomic_write_text(out / "summary.md", table)
    print(table, end="")
    log.info("wrote %d figures and summary.md to %s", len(files), out)
    return 0
