"""Vision data: idx reading, Fashion-MNIST and image-folder sources, batch transforms, splits."""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.data.images import (
    FASHION_MNIST_CLASSES,
    ImageClassificationData,
    ImageInput,
    ImageSplits,
    TensorImageDataset,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
)
from recipes.data.transforms import (
    ImageTransform,
    match_channels,
    normalize,
    random_crop,
    random_horizontal_flip,
    resize,
)
from tests import system_packages


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write ``array`` (uint8) in the idx layout: 0, 0, type 0x08, ndim, big-endian sizes, data."""
    raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    raw += array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


@functools.cache
def _installed_fashion_mnist() -> ImageSplits | None:
    try:
        return load_fashion_mnist()
    except ValueError:  # not installed: the message says how to get it
        return None


def fashion_mnist() -> ImageSplits:
    """The real Fashion-MNIST (Debian's package); fails or skips the test
    where it is not installed (see tests/system_packages.py)."""
    data = _installed_fashion_mnist()
    if data is None:
        system_packages.require("dataset-fashion-mnist", False, "the vision recipes' data")
    return data


@functools.cache
def _stand_in_images(train: int = 1000, test: int = 300) -> ImageSplits:
    """Fashion-MNIST's layout (28 x 28 grey uint8, 10 classes, its class names) with synthetic
    images: class ``k`` is a bright bar at a class-specific place over seeded noise, so tiny
    models learn it. For tests of the data path and the recipes' mechanics, not of accuracy."""
    rng = np.random.default_rng(0)
    splits = []
    for count in (train, test):
        labels = rng.permutation(np.arange(count) % 10)
        images = rng.integers(0, 90, size=(count, 28, 28), dtype=np.uint8)
        for index, label in enumerate(labels):
            row = 3 + 2 * (label % 5)
            if label < 5:
                images[index, row : row + 3, 4:24] = 230  # horizontal bars
            else:
                images[index, 4:24, row : row + 3] = 230  # vertical bars
        splits.append(TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels)))
    return ImageSplits(splits[0], splits[1], FASHION_MNIST_CLASSES, num_channels=1)


def fashion_mnist_or_stand_in() -> ImageSplits:
    """The real Fashion-MNIST where it is installed, else :func:`_stand_in_images`: the tests
    of reading, splitting and training mechanics run on any machine."""
    return _installed_fashion_mnist() or _stand_in_images()


def small_fashion_folder(
    root: Path, train: int = 300, test: int = 100, compress: bool = False
) -> Path:
    """The first images of Fashion-MNIST (or its stand-in), written as idx files into ``root``."""
    full = fashion_mnist_or_stand_in()
    root.mkdir(parents=True, exist_ok=True)
    for name, images, labels, n in (
        ("train", full.train.images, full.train.labels, train),
        ("t10k", full.test.images, full.test.labels, test),
    ):
        write_idx(root / f"{name}-images-idx3-ubyte", images[:n, 0].numpy(), compress)
        write_idx(root / f"{name}-labels-idx1-ubyte", labels[:n].numpy(), compress)
    return root


def test_read_idx_reads_gzipped_and_plain_files_alike(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    plain = read_idx(write_idx(tmp_path / "a-idx3-ubyte", array, compress=False))
    zipped = read_idx(write_idx(tmp_path / "b-idx3-ubyte", array, compress=True))
    assert plain.dtype == torch.uint8 and tuple(plain.shape) == (5, 3, 4)
    assert torch.equal(plain, torch.from_numpy(array))
    assert torch.equal(plain, zipped)


def test_read_idx_rejects_a_file_that_is_not_idx(tmp_path):
    bad = tmp_path / "notes-idx3-ubyte"
    bad.write_bytes(b"hello world")
    with pytest.raises(ValueError, match=r"data\.root: .*not an idx file"):
        read_idx(bad)
    truncated = tmp_path / "cut-idx1-ubyte"
    truncated.write_bytes(struct.pack(">BBBBi", 0, 0, 8, 1, 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)


def test_debian_fashion_mnist_has_the_official_splits():
    data = fashion_mnist()
    assert tuple(data.train.images.shape) == (60_000, 1, 28, 28)
    assert tuple(data.test.images.shape) == (10_000, 1, 28, 28)
    # 6,000 training and 1,000 test images per class
    assert torch.bincount(data.train.labels).tolist() == [6000] * 10
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"


@pytest.mark.parametrize("compress", [False, True])
def test_data_root_reads_any_folder_with_the_four_files(tmp_path, compress):
    root = small_fashion_folder(tmp_path / "fm", train=300, test=100, compress=compress)
    data = load_fashion_mnist(root)
    full = fashion_mnist_or_stand_in()
    assert len(data.train) == 300 and len(data.test) == 100
    assert torch.equal(data.train.images, full.train.images[:300])
    assert torch.equal(data.test.labels, full.test.labels[:100])


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        load_fashion_mnist(tmp_path)
    message = str(error.value)
    assert message.startswith("data.root: ")
    assert str(tmp_path) in message
    assert "t10k-labels-idx1-ubyte" in message and "train-images-idx3-ubyte," not in message
    assert "apt-get install dataset-fashion-mnist" in message


def write_image_folder(
    root: Path, classes: dict[str, int], size: tuple[int, int] = (12, 10), mode: str = "RGB"
) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            channels = (3,) if mode == "RGB" else ()
            pixels = rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / name / f"{i:03d}.png")
    return root


def test_image_folder_numbers_classes_in_sorted_order_and_splits_by_seed(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"zebra": 6, "ant": 4, "mole": 5})
    data = load_image_folder(root, num_channels=3, size=16, test_fraction=0.2, seed=1)
    assert data.classes == ("ant", "mole", "zebra")
    assert len(data.train) + len(data.test) == 15 and len(data.test) == 3
    image, label = data.train[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 16, 16)
    assert 0 <= int(label) < 3
    again = load_image_folder(root, num_channels=3, size=16, test_fraction=0.2, seed=1)
    other = load_image_folder(root, num_channels=3, size=16, test_fraction=0.2, seed=2)
    assert again.test.files == data.test.files
    assert other.test.files != data.test.files
    grey = load_image_folder(root, num_channels=1, size=None)
    assert tuple(grey.train[0][0].shape) == (1, 12, 12)  # the first image's larger side


def test_image_folder_uses_train_and_test_subfolders_when_present(tmp_path):
    write_image_folder(tmp_path / "ds" / "train", {"cat": 3, "dog": 3}, mode="L")
    write_image_folder(tmp_path / "ds" / "test", {"cat": 2, "dog": 1}, mode="L")
    data = load_image_folder(tmp_path / "ds", num_channels=1, size=8)
    assert data.classes == ("cat", "dog")
    assert (len(data.train), len(data.test)) == (6, 3)
    assert data.test.labels.tolist() == [0, 0, 1]


def test_a_folder_without_class_subfolders_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"data\.root: .*one subfolder per class"):
        load_image_folder(tmp_path)


def test_random_crop_shifts_each_image_by_at_most_the_padding():
    images = torch.rand(16, 2, 9, 7)
    out = random_crop(images, 3, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3))
    offsets = set()
    for b in range(16):
        matches = [
            (dy, dx)
            for dy in range(7)
            for dx in range(7)
            if torch.equal(out[b], padded[b, :, dy : dy + 9, dx : dx + 7])
        ]
        assert matches, f"image {b} is not a window of its padded original"
        offsets.add(matches[0])
    assert len(offsets) > 4  # offsets differ between images
    assert torch.equal(out, random_crop(images, 3, torch.Generator().manual_seed(0)))


def test_horizontal_flip_mirrors_about_half_of_the_images():
    images = torch.rand(200, 1, 4, 5)
    out = random_horizontal_flip(images, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images, strict=True)])
    assert bool((flipped | kept).all())
    assert 70 < int(flipped.sum()) < 130


def test_channels_resizing_and_normalization():
    grey = torch.rand(2, 1, 28, 28)
    rgb = match_channels(grey, 3)
    assert tuple(rgb.shape) == (2, 3, 28, 28) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = match_channels(rgb, 1)
    assert torch.allclose(back, grey, atol=1e-6)  # luma weights sum to 1
    with pytest.raises(ValueError, match="num_channels: cannot turn 2-channel"):
        match_channels(torch.rand(1, 2, 4, 4), 3)
    big = resize(grey, 224)
    assert tuple(big.shape) == (2, 1, 224, 224)
    assert abs(big.mean().item() - grey.mean().item()) < 0.01
    x = torch.rand(64, 3, 8, 8) * 4 + 2
    mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()
    z = normalize(x, mean, std)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)


def test_image_transform_checks_its_arguments():
    with pytest.raises(ValueError, match=r"mean: got 2 values .*allowed: 1 or 3"):
        ImageTransform(num_channels=3, mean=(0.5, 0.5), std=(0.5,))
    with pytest.raises(ValueError, match=r"std\[0\]: got 0"):
        ImageTransform(num_channels=1, mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match="crop_padding: got -1"):
        ImageTransform(num_channels=1, mean=(0.5,), std=(0.5,), crop_padding=-1)


def test_image_transform_augments_only_training_batches():
    transform = ImageTransform(num_channels=3, mean=(0.5,), std=(0.25,), image_size=32)
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    evaluation = transform(images, train=False)
    expected = (resize(match_channels(images.float() / 255, 3), 32) - 0.5) / 0.25
    assert torch.allclose(evaluation, expected)
    train = transform(images, train=True, generator=torch.Generator().manual_seed(0))
    assert tuple(train.shape) == (8, 3, 32, 32)
    assert not torch.allclose(train, evaluation)


def test_datamodule_holds_out_a_seeded_validation_split(tmp_path):
    root = small_fashion_folder(tmp_path / "fm", train=300, test=50)
    first = ImageClassificationData(root=str(root), val_size=60, split_seed=3, batch_size=32)
    first.setup("fit")
    train, val = set(first.train_set.indices), set(first.val_set.indices)
    assert (len(train), len(val), len(first.test_set)) == (240, 60, 50)
    assert not train & val and train | val == set(range(300))
    same = ImageClassificationData(root=str(root), val_size=60, split_seed=3)
    same.setup("fit")
    other = ImageClassificationData(root=str(root), val_size=0.2, split_seed=4)
    other.setup("fit")
    assert same.val_set.indices == first.val_set.indices
    assert set(other.val_set.indices) != val and len(other.val_set) == 60
    # normalization from the training images: mean ~0, std ~1 after the transform
    batch = torch.stack([first.train_set[i][0] for i in range(len(first.train_set))])
    z = first.transform(batch, train=False)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


def test_datamodule_adapts_channels_size_and_statistics_to_the_model(tmp_path):
    root = small_fashion_folder(tmp_path / "fm", train=100, test=20)
    data = ImageClassificationData(root=str(root), val_size=20, batch_size=8)
    data.adapt_to(
        ImageInput(num_channels=3, image_size=64, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    )
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    out = data.on_after_batch_transfer(batch, 0)  # no trainer attached: evaluation transform
    assert set(out) == {"pixel_values", "labels"}
    assert tuple(out["pixel_values"].shape) == (8, 3, 64, 64)
    assert data.transform.mean == (0.4, 0.5, 0.6)
    explicit = ImageClassificationData(
        root=str(root), val_size=20, image_size=32, mean=[0.5], std=[0.5]
    )
    explicit.adapt_to(
        ImageInput(num_channels=3, image_size=64, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    )
    explicit.setup("fit")
    assert explicit.transform.image_size == 32 and explicit.transform.mean == (0.5,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"source": "mnist"}, r"data\.source: unknown value 'mnist'.*did you mean 'fashion_mnist'"),
        ({"source": "image_folder"}, r"data\.root: got None"),
        ({"batch_size": 0}, r"data\.batch_size: got 0; allowed: an integer >= 1"),
        ({"val_size": 1.5}, r"data\.val_size: got 1\.5; allowed: a number in \[0\.0, 1\.0\)"),
        ({"max_train_images": 0}, r"data\.max_train_images: got 0"),
    ],
)
def test_datamodule_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        ImageClassificationData(**options)


def test_val_size_must_leave_training_images(tmp_path):
    root = small_fashion_folder(tmp_path / "fm", train=50, test=10)
    data = ImageClassificationData(root=str(root), val_size=50)
    with pytest.raises(
        ValueError, match=r"data\.val_size: got 50 \(50 images\); allowed: fewer than the 50"
    ):
        data.setup("fit")


def test_image_folder_datamodule_batches(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 10, "b": 10}, size=(20, 20))
    data = ImageClassificationData(
        source="image_folder", root=str(root), val_size=4, batch_size=5, split_seed=0
    )
    data.adapt_to(ImageInput(num_channels=3, image_size=24))
    assert data.num_classes == 2
    data.setup("fit")
    assert len(data.train_set) == 12 and len(data.val_set) == 4 and len(data.test_set) == 4
    images, labels = next(iter(data.train_dataloader()))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (5, 3, 20, 20)
    out = data.on_after_batch_transfer((images, labels), 0)
    assert tuple(out["pixel_values"].shape) == (5, 3, 24, 24)
