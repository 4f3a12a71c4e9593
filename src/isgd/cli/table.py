"""``isgd table``: the answer of finished comparisons in one table (method × workload)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

COSTS = ("compute", "passes", "seconds")


def add_parser(commands: Any) -> None:
    table = commands.add_parser(
        "table",
        help="method × workload: each arm's saving at the target against its comparison's "
        "baseline, from finished isgd compare directories",
    )
    table.add_argument("comparisons", nargs="+", metavar="COMPARISON_DIR")
    table.add_argument(
        "--cost",
        choices=COSTS,
        default="compute",
        help="the cost the saving is read in (default compute: backward passes + a third of a "
        "step per forward without backward)",
    )
    table.add_argument(
        "--labels",
        metavar="NAME,NAME,...",
        help="column names, one per comparison (default: the preset or workload and the baseline)",
    )
    table.add_argument("--out", metavar="FILE.md", help="also write the table to this file")


def run(args: argparse.Namespace) -> int:
    from isgd.reporting.answer_table import answer_table
    from isgd.training.runio import atomic_write_text

    labels = args.labels.split(",") if args.labels else ()
    text = answer_table([Path(c) for c in args.comparisons], cost=args.cost, labels=labels)
    if args.out:
        atomic_write_text(Path(args.out), text)
    print(text, end="")
    return 0
