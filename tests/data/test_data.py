"""Data: IDX and CIFAR-10 readers, load_dataset, real MNIST (fetching is in test_fetch.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from isgd.data import (
    IDX_NAMES,
    DataError,
    DataSplit,
    default_data_dir,
    load_cifar10,
    load_dataset,
    load_idx_dir,
    read_idx,
)
from isgd.data import sources as fetching
from tests.fixtures import (
    cifar_like,
    idx_bytes,
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
        r"cifar10, imagenet, idx:DIR, packed:DIR",
    ):
        load_dataset("svhn", tmp_path)


def test_load_dataset_idx_prefix(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "mine", mnist_like(), gz=True)
    split = load_dataset(f"idx:{tmp_path / 'mine'}")
    assert split.x_train.shape == (24, 1, 8, 8) and split.name.startswith("idx:")


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
    assert "`isgd data fetch cifar10`" in message and "--from FILE" in message


# ------------------------------------------------------------------------------ real MNIST
def _present(name: str) -> Path | None:
    directory = default_data_dir() / name
    return directory if all(fetching.find_idx_file(directory, n) for n in IDX_NAMES) else None


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


def test_hold_out_keeps_the_statistics(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, mnist_like(n_train=64, size=12))
    data = load_idx_dir(tmp_path)
    tune = data.hold_out(16)
    assert (len(tune.x_train), len(tune.x_test)) == (48, 16)
    assert torch.equal(tune.x_test, data.x_train[-16:]) and torch.equal(
        tune.y_test, data.y_train[-16:]
    )
    assert (tune.mean, tune.std) == (data.mean, data.std)  # not recomputed on the 48
    assert torch.equal(tune.mean_image(), data.mean_image())
