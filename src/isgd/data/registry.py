"""The one list of data sets isgd knows by name (standard library only, so that configuration
checks need no data code): the names that live in the data directory, and the two that name a
folder of their own. ``shakespeare`` is fetched into the data directory too, but it is text, read
by the ``charlm-shakespeare`` workload, not a ``dataset`` of the image workload."""

from __future__ import annotations

__all__ = ["FETCHABLE", "IN_DATA_DIR", "KNOWN", "describe", "is_known"]

IN_DATA_DIR = ("mnist", "fashion-mnist", "cifar10", "imagenet")  # <data dir>/<name>/
FETCHABLE = ("mnist", "fashion-mnist", "cifar10", "shakespeare")  # isgd data fetch NAME
FOLDER_PREFIXES = {
    "idx:": "idx:DIR (a folder of IDX files)",
    "packed:": "packed:DIR (made by isgd data pack)",
}

KNOWN = (*IN_DATA_DIR, *(f"{prefix}DIR" for prefix in FOLDER_PREFIXES))


def is_known(name: str) -> bool:
    return name in IN_DATA_DIR or name.startswith(tuple(FOLDER_PREFIXES))


def describe() -> str:
    """``mnist, fashion-mnist, cifar10, imagenet, idx:DIR (...) or packed:DIR (...)``."""
    return ", ".join((*IN_DATA_DIR, *list(FOLDER_PREFIXES.values())[:-1])) + (
        f" or {list(FOLDER_PREFIXES.values())[-1]}"
    )
