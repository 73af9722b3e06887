"""Image data for the vision recipes: Fashion-MNIST idx files, image folders, one DataModule.

Sources
    ``fashion_mnist``: the four idx files of Fashion-MNIST (Xiao et al. 2017; 60,000 training
    and 10,000 test images, 28 x 28 grey, 10 classes), gzipped or not, from ``root`` or, by
    default, from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).
    ``image_folder``: one subfolder per class (``root/<class>/*.png``); with ``root/train`` and
    ``root/test`` subfolders those are the splits, otherwise a seeded share becomes the test set.

Validation images are a seeded random share of the training images; the test set stays the
official one. Batches travel as ``uint8`` and are augmented, matched to the model's channels and
size, and normalized on the device by :class:`~recipes.data.transforms.ImageTransform`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from optim_callbacks.validation import (
    check_at_least,
    check_choice,
    check_in_range,
)
from recipes.core.seeding import derived_seed
from recipes.data.resume import ResumableTrainOrder
from recipes.data.splits import NamedClasses, stratified_order
from recipes.data.transforms import ImageTransform, resize

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "ImageClassificationData",
    "ImageFolderDataset",
    "ImageInput",
    "ImageSplits",
    "TensorImageDataset",
    "load_fashion_mnist",
    "load_image_folder",
    "read_idx",
]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET_FASHION_MNIST = (
    "install Debian's package (`sudo apt-get install dataset-fashion-mnist`, files land in "
    f"{DEBIAN_FASHION_MNIST}) or download the four files from "
    "https://github.com/zalandoresearch/fashion-mnist and pass their folder as --data.root"
)
# idx type codes (http://yann.lecun.com/exdb/mnist/): big-endian numbers after the header.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SOURCES = ("fashion_mnist", "image_folder")


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read one idx file (gzipped when its name ends in ``.gz``) into a tensor.

    Layout: two zero bytes, a type code, the number of dimensions ``n``, ``n`` big-endian
    int32 sizes, then the values in C order.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"data.root: {str(path)!r} is not an idx file (bad magic number {raw[:4]!r})"
        )
    ndim = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = 4 + 4 * ndim + dtype.itemsize * int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"data.root: {str(path)!r} is truncated ({len(raw)} bytes, expected {expected})"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (
        stem,
        f"{stem}.gz",
        stem.replace("-idx", ".idx"),
        f"{stem.replace('-idx', '.idx')}.gz",
    ):
        if (root / name).is_file():
            return root / name
    return None


@dataclass(frozen=True)
class ImageSplits:
    """A source's datasets (``val`` is carved out of ``train`` by the DataModule)."""

    train: Dataset
    test: Dataset
    classes: tuple[str, ...]
    num_channels: int


class TensorImageDataset(Dataset):
    """In-memory ``uint8`` images ``[N, C, H, W]`` with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim == 3:
            images = images[:, None]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"labels: got {labels.shape[0]} labels for {images.shape[0]} images")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def load_fashion_mnist(root: str | os.PathLike[str] | None = None) -> ImageSplits:
    """Fashion-MNIST from ``root`` (default: Debian's folder). Missing files give one
    ``ValueError`` that says how to get them."""
    folder = Path(root) if root is not None else Path(DEBIAN_FASHION_MNIST)
    found = {key: _find_idx(folder, stem) for key, stem in _FASHION_MNIST_FILES.items()}
    missing = [_FASHION_MNIST_FILES[key] for key, path in found.items() if path is None]
    if missing:
        where = "--data.root" if root is not None else "the default folder"
        raise ValueError(
            f"data.root: Fashion-MNIST not found in {str(folder)!r} ({where}); missing "
            f"{', '.join(missing)} (.gz or not); to get it, {_HOW_TO_GET_FASHION_MNIST}"
        )
    tensors = {key: read_idx(path) for key, path in found.items()}
    return ImageSplits(
        train=TensorImageDataset(tensors["train_images"], tensors["train_labels"]),
        test=TensorImageDataset(tensors["test_images"], tensors["test_labels"]),
        classes=FASHION_MNIST_CLASSES,
        num_channels=1,
    )


def _decode_image(path: Path, num_channels: int, size: int | None) -> torch.Tensor:
    from PIL import Image  # Pillow comes with the recipes' extras (matplotlib needs it)

    with Image.open(path) as image:
        mode = "L" if num_channels == 1 else "RGB"
        array = np.asarray(image.convert(mode), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if size is not None and tuple(tensor.shape[-2:]) != (size, size):
        tensor = resize(tensor[None].float(), size)[0].round().clamp(0, 255).to(torch.uint8)
    return tensor


class ImageFolderDataset(Dataset):
    """Images decoded on access (Pillow), converted to ``num_channels`` and resized to
    ``size x size`` so they stack into batches."""

    def __init__(
        self, files: Sequence[Path], labels: Sequence[int], num_channels: int, size: int
    ) -> None:
        self.files = list(files)
        self.labels = torch.tensor(list(labels), dtype=torch.long)
        self.num_channels = num_channels
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _decode_image(self.files[index], self.num_channels, self.size), self.labels[index]


def _class_files(folder: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    return files, labels


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    num_channels: int = 3,
    size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ImageSplits:
    """Images from ``root/<class>/...`` (class names sorted, so label numbers do not depend on
    the file system). ``root/train`` + ``root/test`` are used as given; otherwise a seeded
    ``test_fraction`` of each folder's images becomes the test set. ``size`` defaults to the
    first image's larger side."""
    folder = Path(root)
    train_dir, test_dir = folder / "train", folder / "test"
    split_given = train_dir.is_dir() and test_dir.is_dir()
    class_root = train_dir if split_given else folder
    classes = (
        sorted(p.name for p in class_root.iterdir() if p.is_dir()) if class_root.is_dir() else []
    )
    files, labels = _class_files(class_root, classes)
    if len(classes) < 2 or not files:
        raise ValueError(
            f"data.root: {str(folder)!r} holds no image folder; allowed: a folder with one "
            f"subfolder per class (at least 2) of {'/'.join(_IMAGE_SUFFIXES)} images, "
            "optionally split into train/ and test/"
        )
    if size is None:
        size = max(_decode_image(files[0], num_channels, None).shape[-2:])
    if split_given:
        test_files, test_labels = _class_files(test_dir, classes)
        train = ImageFolderDataset(files, labels, num_channels, size)
        test = ImageFolderDataset(test_files, test_labels, num_channels, size)
    else:
        check_in_range("data.test_fraction", test_fraction, 0.0, 1.0, low_inclusive=False)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, round(test_fraction * len(files)))
        pick = lambda idx: ([files[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        train = ImageFolderDataset(*pick(sorted(order[cut:])), num_channels, size)
        test = ImageFolderDataset(*pick(sorted(order[:cut])), num_channels, size)
    return ImageSplits(train=train, test=test, classes=tuple(classes), num_channels=num_channels)


@dataclass(frozen=True)
class ImageInput:
    """What a model expects to see: channels, side length (``None``: any) and, when its
    checkpoint says so, normalization statistics."""

    num_channels: int
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _dataset_statistics(
    dataset: Dataset, limit: int = 10_000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ``limit`` images, on the [0, 1] scale."""
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorImageDataset):
        images = dataset.dataset.images[torch.as_tensor(dataset.indices[:limit])]
    else:
        images = torch.stack([dataset[i][0] for i in range(min(limit // 20, len(dataset)))])
    pixels = images.float().div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(pixels.mean(dim=1).tolist()), tuple(pixels.std(dim=1).clamp_min(1e-3).tolist())


class ImageClassificationData(NamedClasses, ResumableTrainOrder, L.LightningDataModule):
    """Fashion-MNIST (default) or an image folder, split train/val/test, transformed per batch.

    The data is read (and checked) when the module is built, so a missing folder is reported
    before training starts. What the model expects (channels, size, normalization) comes from
    the LightningModule's ``image_input`` attribute when the Trainer sets the data up, or from
    :meth:`adapt_to`; the options below override it.

    Args:
        source: ``fashion_mnist`` or ``image_folder``.
        root: folder with the four Fashion-MNIST idx files (gz or not; default: Debian's
            ``/usr/share/datasets/fashion-mnist``) or the image folder (required for it).
        batch_size: images per batch and device.
        val_size: training images held out for validation: a count (int) or a fraction (float).
        split_seed: seed of the validation split (and of an image folder's test split); fixed,
            so runs with other training seeds share their validation set. Shuffling and
            augmentation follow the run's seed (``--seed_everything``).
        augment: augment training batches: random crops (when ``crop_padding`` > 0) and
            mirroring (with ``horizontal_flip``).
        crop_padding: pixels of zero padding for the random crop (shifts of up to that much);
            0 (no crops) by default: within the few epochs of the CPU presets crops slowed
            learning (2-4 px cost 5-7 points of accuracy after 300 steps); they are the usual choice
            for longer runs (4 px on CIFAR).
        horizontal_flip: mirror half of the training images.
        image_size: side length fed to the model; ``None`` = what the model expects (a
            checkpoint's size, e.g. 224), else the source's own size (28 for Fashion-MNIST).
        num_channels: channels fed to the model; ``None`` = what the model expects.
        mean: normalization mean per channel (or one value); ``None`` = the checkpoint's when
            it has one, else that of the training images.
        std: normalization standard deviation, likewise.
        max_train_images: train on only the first N training images (quick trials, tests).
        max_eval_images: validate and test on only the first N images of each split.
        test_fraction: image folders without train/ and test/ subfolders: share used as test set.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        source: Literal["fashion_mnist", "image_folder"] = "fashion_mnist",
        root: str | None = None,
        batch_size: int = 128,
        val_size: int | float = 5000,
        split_seed: int = 0,
        augment: bool = True,
        crop_padding: int = 0,
        horizontal_flip: bool = True,
        image_size: int | None = None,
        num_channels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        max_train_images: int | None = None,
        max_eval_images: int | None = None,
        test_fraction: float = 0.2,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_choice("data.source", source, SOURCES)
        if source == "image_folder" and root is None:
            raise ValueError(
                "data.root: got None; allowed: a folder with one subfolder per class "
                "(source 'image_folder' needs it)"
            )
        check_at_least("data.batch_size", batch_size, 1)
        if isinstance(val_size, float):
            check_in_range("data.val_size", val_size, 0.0, 1.0)
        else:
            check_at_least("data.val_size", val_size, 0)
        check_at_least("data.crop_padding", crop_padding, 0)
        check_at_least("data.num_workers", num_workers, 0)
        for name, value in (
            ("data.image_size", image_size),
            ("data.num_channels", num_channels),
            ("data.max_train_images", max_train_images),
            ("data.max_eval_images", max_eval_images),
        ):
            if value is not None:
                check_at_least(name, value, 1)
        self.save_hyperparameters()
        self.splits = self._read_source()
        self.model_input: ImageInput | None = None
        self.transform: ImageTransform | None = None
        self.train_batches_seen = 0

    def _read_source(self) -> ImageSplits:
        hp = self.hparams
        if hp.source == "fashion_mnist":
            return load_fashion_mnist(hp.root)
        return load_image_folder(
            hp.root,
            num_channels=hp.num_channels or 3,
            size=hp.image_size,
            test_fraction=hp.test_fraction,
            seed=hp.split_seed,
        )

    @property
    def classes(self) -> Sequence[str]:
        return self.splits.classes

    def adapt_to(self, model_input: ImageInput) -> None:
        """Feed a model that expects ``model_input`` (explicit options still win)."""
        self.model_input = model_input
        self.transform = None

    # --- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        hp = self.hparams
        train_all = self.splits.train
        order = torch.randperm(
            len(train_all), generator=torch.Generator().manual_seed(hp.split_seed)
        )
        val_count = (
            round(hp.val_size * len(train_all)) if isinstance(hp.val_size, float) else hp.val_size
        )
        if val_count >= len(train_all):
            raise ValueError(
                f"data.val_size: got {hp.val_size!r} ({val_count} images); allowed: fewer than the "
                f"{len(train_all)} training images"
            )
        self.train_set = Subset(train_all, order[val_count:].tolist()[: hp.max_train_images])
        self.val_set = Subset(train_all, order[:val_count].tolist()[: hp.max_eval_images])
        # Classes interleaved, so that max_eval_images or limit_test_batches tests all of them.
        test_order = stratified_order(self.splits.test.labels.tolist(), hp.split_seed)
        self.test_set = Subset(self.splits.test, test_order[: hp.max_eval_images])
        module = self.trainer.lightning_module if self.trainer is not None else None
        wanted = getattr(module, "image_input", None)
        if wanted is not None and wanted != self.model_input:
            self.adapt_to(wanted)
        if self.transform is None:
            self.transform = self._make_transform()

    def _make_transform(self) -> ImageTransform:
        hp = self.hparams
        wanted = self.model_input
        channels = hp.num_channels or (wanted.num_channels if wanted else self.splits.num_channels)
        size = hp.image_size or (wanted.image_size if wanted else None)
        mean, std = hp.mean, hp.std
        if mean is None or std is None:
            if wanted is not None and wanted.mean is not None and wanted.std is not None:
                own_mean, own_std = wanted.mean, wanted.std
            else:
                own_mean, own_std = _dataset_statistics(self.train_set)
                if channels == 1 or len(own_mean) == 1:
                    # one value for every channel: grey statistics hold for repeated channels
                    own_mean = (sum(own_mean) / len(own_mean),)
                    own_std = (sum(own_std) / len(own_std),)
            mean = mean if mean is not None else own_mean
            std = std if std is not None else own_std
        return ImageTransform(
            num_channels=channels,
            mean=tuple(mean),
            std=tuple(std),
            image_size=size,
            crop_padding=hp.crop_padding if hp.augment else 0,
            horizontal_flip=hp.horizontal_flip and hp.augment,
        )

    def _loader(self, dataset: Dataset, sampler: Any = None) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # The shuffle follows the run's seed (as Lightning's DistributedSampler does under DDP).
        return self._loader(self.train_set, self.train_sampler(self.train_set))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> dict[str, torch.Tensor]:
        """``uint8`` images -> the model's ``pixel_values`` (in the dtype of the run's precision,
        e.g. float16 under ``16-true``). Training batches are augmented with
        a generator seeded by (run seed, rank, training batches so far): a resumed run draws
        the crops and flips the uninterrupted one drew."""
        images, labels = batch
        if self.transform is None:
            raise RuntimeError("setup() builds the transform; call it before transforming batches")
        train = self.trainer is not None and self.trainer.training
        generator = None
        if train:
            seed = derived_seed(self.trainer.global_rank, self.train_batches_seen)
            generator = torch.Generator().manual_seed(seed)
            self.train_batches_seen += 1
        batch = {"pixel_values": self.transform(images, train=train, generator=generator)}
        if self.trainer is not None:  # Lightning converts inputs before this hook, while uint8
            batch = self.trainer.precision_plugin.convert_input(batch)  # 16-true: float16 etc.
        return {**batch, "labels": labels}

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches_seen": self.train_batches_seen, **self.train_order_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_batches_seen = int(state_dict["train_batches_seen"])
        self.load_train_order_state(state_dict)
