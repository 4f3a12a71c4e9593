"""Packed image sets: ``isgd data pack`` from an image folder, memory-mapped loading, crops, and
training on ``packed:DIR`` (the ImageNet/AlexNet path, on a tiny folder of real image files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isgd.cli import main
from isgd.data import DataError, load_dataset
from isgd.data.packed import load_packed, pack_image_folder
from isgd.data.preprocess import Preprocess
from isgd.training import runio

CLASSES = ("cat", "dog", "fish")


def write_image_folder(root: Path, per_class: int = 6, val_per_class: int = 2) -> dict:
    """``root/{train,val}/<class>/*.{png,jpg}`` of varied sizes and modes; returns the pixels the
    packer must produce for the PNGs (lossless), keyed by path."""
    rng = np.random.default_rng(0)
    expected = {}
    for split, n in (("train", per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = 20 + 3 * i, 24 + 2 * label  # not square, not the packed size
                base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                base[..., label] = 255 - 20 * label  # each class has its own dominant channel
                path = folder / f"{i:03d}.png"
                Image.fromarray(base).save(path)
                expected[path] = base
            Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").save(
                folder / "gray.jpg"  # a greyscale JPEG: converted to RGB
            )
    return expected


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("imagefolder")
    expected = write_image_folder(root)
    out = pack_image_folder(root, tmp_path_factory.mktemp("p") / "packed", size=16, workers=2)
    return root, out, expected


def test_pack_writes_what_load_reads(packed) -> None:
    _, out, expected = packed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["size"] == 16 and meta["channels"] == 3
    assert (meta["train"], meta["test"]) == (3 * 7, 3 * 3)
    data = load_packed(out)
    assert data.x_train.shape == (21, 3, 16, 16) and data.x_train.dtype == torch.uint8
    assert data.num_classes == 3 and data.y_train.tolist() == sorted(data.y_train.tolist())
    assert data.y_test.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    # the PNG pixels, warped to 16×16 with Pillow's bilinear filter, in C×H×W order
    first = sorted(p for p in expected if "train/cat" in str(p))[0]
    want = np.asarray(Image.fromarray(expected[first]).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(data.x_train[0].numpy(), want.transpose(2, 0, 1))
    # statistics written at pack time are those of the training images
    x = data.x_train.double() / 255
    np.testing.assert_allclose(data.mean, x.mean((0, 2, 3)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(data.std, x.std((0, 2, 3), unbiased=False).numpy(), rtol=1e-10)
    torch.testing.assert_close(data.mean_image(), data.x_train.float().mean(0), atol=1e-4, rtol=0)
    data.x_train[0].zero_()  # memory-mapped copy-on-write: never written back
    assert load_packed(out).x_train[0].sum() > 0


def test_dataset_prefix_and_cli(packed, tmp_path, capsys) -> None:
    root, out, _ = packed
    assert load_dataset(f"packed:{out}").x_test.shape == (9, 3, 16, 16)
    again = tmp_path / "again"
    argv = ["data", "pack", str(root), str(again), "--size", "12", "--grayscale", "--workers", "1"]
    assert main(argv) == 0
    assert load_packed(again).x_train.shape == (21, 1, 12, 12)
    assert f"--dataset packed:{again}" in capsys.readouterr().err


def bad_packs(tmp_path: Path, good: Path):
    """(what to run, the message expected)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    no_val = tmp_path / "noval"
    (no_val / "train" / "a").mkdir(parents=True)
    broken = tmp_path / "broken"
    write_image_folder(broken, per_class=1, val_per_class=1)
    (broken / "train" / "dog" / "zzz.png").write_bytes(b"not an image")
    stray = tmp_path / "stray"
    write_image_folder(stray, per_class=1, val_per_class=1)
    (stray / "val" / "horse").mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    return [
        (["data", "pack", str(empty), str(tmp_path / "o1")], "train/<class>/"),
        (["data", "pack", str(no_val), str(tmp_path / "o2")], "val/<class>/"),
        (["data", "pack", str(broken), str(tmp_path / "o3")], "zzz.png: not a readable image"),
        (["data", "pack", str(stray), str(tmp_path / "o4")], "class folders not in train/: horse"),
        (["data", "pack", str(good), str(full)], "exists and is not empty"),
        (["data", "pack", str(good), str(tmp_path / "o5"), "--size", "2"], "invalid size"),
    ]


def test_pack_bad_input_one_line_exit_2(packed, tmp_path, capsys) -> None:
    root, _, _ = packed
    for argv, message in bad_packs(tmp_path, root):
        capsys.readouterr()
        assert main([*argv, "--workers", "1"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "o3" / "meta.json").exists()  # a failed pack is not loadable
    (tmp_path / "again").mkdir()
    unreadable = bad_packs(tmp_path / "again", root)[2][0]
    assert main([*unreadable, "--workers", "2"]) == 2  # raised in a worker process: one line too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zzz.png: not a readable image" in err[0], err
    with pytest.raises(DataError, match=r"no meta\.json"):
        load_packed(tmp_path / "o3")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "meta.json").write_text("{}"), "not an isgd-packed v1"),
        (lambda d: (d / "test_labels.npy").unlink(), "missing test_labels.npy"),
        (lambda d: np.save(d / "train_images.npy", np.zeros((2, 3, 16, 16), np.uint8)), "says"),
        (lambda d: (d / "train_labels.npy").write_bytes(b"junk"), "not a readable .npy"),
        (lambda d: np.save(d / "test_labels.npy", np.zeros(9, np.int32)), "expected int64"),
    ],
)
def test_load_packed_refuses_damage(packed, tmp_path, damage, message) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(packed[1], copy)
    damage(copy)
    with pytest.raises(DataError, match=message):
        load_packed(copy)


# ------------------------------------------------------------------------------------ crops
def test_crops_random_in_training_centre_otherwise() -> None:
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.int64).view(2, 3, 10, 10).to(torch.uint8)
    pre = Preprocess("scale", crop_size=6, random_crop=True, seed=0)
    centre = pre(x)
    torch.testing.assert_close(centre, x[:, :, 2:8, 2:8].float() / 256, rtol=0, atol=0)
    seen = set()
    for _ in range(30):
        out = (pre(x, train=True) * 256).round().to(torch.uint8)
        assert out.shape == (2, 3, 6, 6)
        for i in range(2):  # every crop is a 6×6 window of its own image, all channels alike
            hits = [
                (t, s)
                for t in range(5)
                for s in range(5)
                if torch.equal(out[i], x[i, :, t : t + 6, s : s + 6])
            ]
            assert len(hits) == 1
            seen.add(hits[0])
    assert len(seen) > 10  # offsets vary over the 25 possible
    fixed = Preprocess("scale", crop_size=6, random_crop=False)
    torch.testing.assert_close(fixed(x, train=True), centre, rtol=0, atol=0)
    with pytest.raises(ValueError, match="larger than the images"):
        Preprocess("scale", crop_size=11)(x)


def test_mean_subtract_with_a_crop_uses_the_mean_pixel(packed) -> None:
    data = load_packed(packed[1])
    pre = Preprocess.for_data(data, "mean_subtract", crop_size=12)
    out = pre(data.x_train)
    assert out.shape[2:] == (12, 12)
    pixel = data.mean_image().mean((1, 2))
    torch.testing.assert_close(
        out, data.x_train[:, :, 2:14, 2:14].float() - pixel.view(1, 3, 1, 1), rtol=0, atol=1e-4
    )


# ------------------------------------------------------------------------------------ training
def test_train_on_packed_with_random_crops_and_resume(packed, tmp_path) -> None:
    out = packed[1]
    argv = [
        *f"train --dataset packed:{out} --model mlp --crop-size 12 --augment".split(),
        *["--normalize", "mean_subtract", "--batch-size", "5", "--iters", "9", "--eval-every", "3"],
        *["--checkpoint-every", "4", "--lr", "0.001", "--lr-policy", "fixed", "--threads", "1"],
        *["--no-progress", "--no-tensorboard", "--sigma-factor", "0.5"],
    ]
    run = tmp_path / "run"
    assert main([*argv, "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 9 and summary["n_batches_per_epoch"] == 4
    assert summary["isgd/triggers"] > 0  # the chart runs on the packed set too
    metrics = [runio.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 3, 6, 9]
    assert all(0 <= m["test/accuracy"] <= 1 for m in metrics)
    # resume from the checkpoint at 8: the same crops are drawn again, the same model comes out
    crashed = tmp_path / "crashed"
    import shutil

    shutil.copytree(run, crashed)
    for name in ("summary.json", "model.pt"):
        (crashed / name).unlink()
    assert main(["train", "--resume", str(crashed), "--no-progress"]) == 0
    assert (crashed / "model.pt").read_bytes() == (run / "model.pt").read_bytes()


def test_imagenet_is_the_packed_set_in_the_data_directory(packed, tmp_path) -> None:
    import shutil

    from isgd.training.config import resolve_config

    with pytest.raises(DataError, match=r"isgd data pack SRC .*imagenet"):
        load_dataset("imagenet", tmp_path)
    shutil.copytree(packed[1], tmp_path / "imagenet")
    assert load_dataset("imagenet", tmp_path).num_classes == 3
    c = resolve_config("alexnet-imagenet")  # Caffe's bvlc_alexnet solver
    assert (c.dataset, c.model, c.batch_size, c.crop_size, c.augment) == (
        "imagenet",
        "alexnet",
        256,
        227,
        True,
    )
    assert (c.lr, c.lr_policy, c.step_size, c.iters, c.target) == (
        0.01,
        "step",
        100_000,
        450_000,
        0.56,
    )
