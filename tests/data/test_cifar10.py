"""``isgd data fetch cifar10``: the official tarball over HTTP (a loopback server serving a small
fixture in the real format; no test needs the internet), local copies with ``--from``, and the
variant that results carry."""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isgd.cli import main
from isgd.data import cifar10, load_dataset
from tests.fixtures import cifar_like, md5, write_cifar_python

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
SHARED_JPEG = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _official_tarball(tmp_path: Path) -> tuple[Path, list]:
    batches = cifar_like()
    write_cifar_python(tmp_path / "src" / "cifar-10-batches-py", batches)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return tarball, batches


@pytest.fixture
def http_server(tmp_path):
    """Serves ``tmp_path/www`` on 127.0.0.1; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no access log on stderr
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _expect_batches(data, batches) -> None:
    x_train = torch.cat([torch.from_numpy(d).view(-1, 3, 32, 32) for d, _ in batches[:5]])
    assert torch.equal(data.x_train, x_train)
    assert data.y_train.tolist() == [label for _, labels in batches[:5] for label in labels]
    assert torch.equal(data.x_test, torch.from_numpy(batches[5][0]).view(-1, 3, 32, 32))


def test_fetch_downloads_the_official_tarball_and_checks_its_md5(
    tmp_path, http_server, monkeypatch, capsys
):
    root, url = http_server
    tarball, batches = _official_tarball(tmp_path)
    (root / "cifar-10-python.tar.gz").write_bytes(tarball.read_bytes())
    monkeypatch.setattr(cifar10, "OFFICIAL_URL", f"{url}/cifar-10-python.tar.gz")
    monkeypatch.setattr(cifar10, "OFFICIAL_MD5", md5(tarball.read_bytes()))
    data_dir = tmp_path / "data"
    assert main(["data", "fetch", "cifar10", "--data-dir", str(data_dir)]) == 0
    data = load_dataset("cifar10", data_dir)
    _expect_batches(data, batches)
    assert data.variant == "CIFAR-10"
    source = json.loads((data_dir / "cifar10" / "source.json").read_text())
    assert source["origin"].startswith("http://127.0.0.1") and source["md5"] == md5(
        tarball.read_bytes()
    )

    # a download whose md5 differs is refused, and the installed copy is left as it was
    (root / "cifar-10-python.tar.gz").write_bytes(tarball.read_bytes()[:-7] + b"garbage")
    capsys.readouterr()
    assert main(["data", "fetch", "cifar10", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the expected" in err[0] and "nothing was installed" in err[0]
    _expect_batches(load_dataset("cifar10", data_dir), batches)

    # no server: one line that says how to bring a copy downloaded elsewhere
    monkeypatch.setattr(cifar10, "OFFICIAL_URL", f"{url}/missing.tar.gz")
    assert main(["data", "fetch", "cifar10", "--data-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot download" in err[0] and "--from FILE" in err[0]
    assert not (tmp_path / "other" / "cifar10").exists()


def test_fetch_from_the_official_tarball_or_its_folder(tmp_path, monkeypatch):
    tarball, batches = _official_tarball(tmp_path)
    monkeypatch.setattr(cifar10, "OFFICIAL_MD5", md5(tarball.read_bytes()))
    for i, source in enumerate(
        (tarball, tmp_path / "src", tmp_path / "src" / "cifar-10-batches-py")
    ):
        data_dir = tmp_path / f"data{i}"
        argv = ["data", "fetch", "cifar10", "--data-dir", str(data_dir), "--from", str(source)]
        assert main(argv) == 0
        data = load_dataset("cifar10", data_dir)
        _expect_batches(data, batches)
        assert data.variant == "CIFAR-10"


def _image_folder(root: Path, fmt: str, n_train: int = 2, n_test: int = 1, size=(32, 32)):
    """``root/{train,test}/<class>/NNNN.<ext>`` with random images; returns pixels per split."""
    rng = np.random.default_rng(0)
    pixels: dict[str, list[tuple[int, np.ndarray]]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(cifar10.CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                path = folder / f"{j:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
                Image.fromarray(array).save(path, fmt, **({"quality": 75} if fmt == "JPEG" else {}))
                pixels[split].append((label, array))
    return pixels


def _sorted_records(x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, bytes]]:
    return sorted((int(label), image.numpy().tobytes()) for image, label in zip(x, y))


def test_fetch_from_an_image_folder_keeps_the_pixels_and_names_the_variant(tmp_path, capsys):
    pixels = _image_folder(tmp_path / "png", "PNG")
    data_dir = tmp_path / "data"
    argv = [
        "data",
        "fetch",
        "cifar10",
        "--data-dir",
        str(data_dir),
        "--from",
        str(tmp_path / "png"),
    ]
    assert main(argv) == 0
    data = load_dataset("cifar10", data_dir)
    assert data.variant == "CIFAR-10 (PNG)"
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        expected = sorted(
            (label, torch.from_numpy(a).permute(2, 0, 1).numpy().tobytes())
            for label, a in pixels[split]
        )
        assert _sorted_records(x, y) == expected  # lossless: the same pixels, labels by class
    assert data.y_train[:10].tolist() != sorted(data.y_train[:10].tolist())  # stored mixed

    # JPEG at quality 75, as a tar of the folder: the quality is read off the files
    _image_folder(tmp_path / "jpeg", "JPEG")
    tar_path = tmp_path / "jpeg.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tmp_path / "jpeg", arcname=".")
    argv[-1] = str(tar_path)
    assert main(argv) == 0
    assert load_dataset("cifar10", data_dir).variant == "CIFAR-10 (JPEG q75)"

    # ... and a run on it says so in its provenance
    run = tmp_path / "run"
    train = f"train --dataset cifar10 --data-dir {data_dir} --model mlp --batch-size 5 --iters 2"
    assert main([*train.split(), "--threads", "1", "--no-progress", "--out", str(run)]) == 0
    assert json.loads((run / "provenance.json").read_text())["data"] == "CIFAR-10 (JPEG q75)"


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda root: _image_folder(root, "PNG", size=(33, 32)),
            "33×32 image; CIFAR-10 images are 32×32",
        ),
        (
            lambda root: (
                _image_folder(root, "PNG"),
                (root / "train" / "airplane").rename(root / "train" / "plane"),
            ),
            "class folder 'plane' is not a CIFAR-10 class",
        ),
        (
            lambda root: (
                _image_folder(root, "PNG"),
                (root / "test" / "cat" / "0000.png").write_bytes(b"no"),
            ),
            "not a readable image",
        ),
        (lambda root: root.mkdir(), "no images under train/<class>/"),
    ],
)
def test_bad_local_copies_are_refused_in_one_line(tmp_path, capsys, make, message):
    make(tmp_path / "src")
    data_dir = tmp_path / "data"
    capsys.readouterr()
    argv = [
        "data",
        "fetch",
        "cifar10",
        "--data-dir",
        str(data_dir),
        "--from",
        str(tmp_path / "src"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (data_dir / "cifar10").exists()


def test_from_is_for_cifar10_only(tmp_path, capsys):
    assert main(["data", "fetch", "mnist", "--from", str(tmp_path)]) == 2
    assert "--from is for cifar10 only" in capsys.readouterr().err


def test_jpeg_quality_is_read_from_the_quantisation_tables():
    for quality in (50, 75, 90):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (120, 30, 200)).save(buffer, "JPEG", quality=quality)
        with Image.open(buffer) as image:
            assert cifar10.jpeg_quality(image.quantization) == quality


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_JPEG.is_file(), reason="../shared/data/cifar10-jpeg.tar.gz absent")
def test_the_shared_jpeg_copy_is_ingested_whole(tmp_path):
    argv = ["data", "fetch", "cifar10", "--data-dir", str(tmp_path), "--from", str(SHARED_JPEG)]
    assert main(argv) == 0
    data = load_dataset("cifar10", tmp_path)
    assert data.variant == "CIFAR-10 (JPEG q75)"
    assert data.y_train.bincount().tolist() == [5000] * 10
    assert data.y_test.bincount().tolist() == [1000] * 10
    # ../shared/data/README.md: decoded means 0.4913 / 0.4821 / 0.4465
    assert data.mean == pytest.approx((0.4913, 0.4821, 0.4465), abs=1e-4)
