"""Image batch transforms in plain torch: augmentation, channel matching, resizing, normalization.

They work on whole batches of ``uint8`` images (``[B, C, H, W]``) after the batch reached its
device, so augmentation costs a few tensor ops per batch instead of Python work per image.

- random crop with zero padding (Krizhevsky et al. 2012; the CIFAR recipe of He et al. 2016):
  pad ``p`` pixels on every side and cut a random ``H x W`` window, i.e. shift the image by up
  to ``p`` pixels in each direction;
- horizontal flip with probability 1/2;
- channel matching: grey -> RGB repeats the channel; RGB -> grey takes the ITU-R BT.601 luma
  ``0.299 R + 0.587 G + 0.114 B``;
- bilinear resizing (antialiased when shrinking) for checkpoints trained at another size;
- normalization ``(x - mean) / std`` per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from optim_callbacks.validation import check_at_least, check_positive

__all__ = [
    "ImageTransform",
    "match_channels",
    "normalize",
    "random_crop",
    "random_horizontal_flip",
    "resize",
]

_LUMA = (0.299, 0.587, 0.114)


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad ``padding`` pixels on each side and cut a random window of the original size,
    one offset per image (drawn on the CPU from ``generator``)."""
    if padding == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator).to(images.device)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # [B, W]
    index = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indices around a slice put their broadcast shape first: [B, H, W, C].
    return padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_horizontal_flip(
    images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator).to(images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def match_channels(images: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Grey -> RGB by repetition, RGB -> grey by luma; other conversions are errors."""
    have = images.shape[1]
    if have == num_channels:
        return images
    if have == 1:
        return images.expand(-1, num_channels, -1, -1)
    if have == 3 and num_channels == 1:
        weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)
        return (images * weights[None, :, None, None]).sum(dim=1, keepdim=True)
    raise ValueError(
        f"num_channels: cannot turn {have}-channel images into {num_channels} channels; "
        "allowed: 1 -> any, 3 -> 1, or equal counts"
    )


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to ``size x size`` (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = size < max(images.shape[-2:])
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking
    )


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device)[None, :, None, None]
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device)[None, :, None, None]
    return (images - mean_t) / std_t


@dataclass(frozen=True)
class ImageTransform:
    """``uint8 [B, C, H, W]`` -> normalized float images the model expects.

    ``image_size`` ``None`` keeps the source size; ``mean``/``std`` hold one value per output
    channel (a single value is used for every channel). Augmentation (crop, flip) runs at the
    source size, before resizing, and only when ``train`` is true.
    """

    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None = None
    crop_padding: int = 4
    horizontal_flip: bool = True

    def __post_init__(self) -> None:
        check_at_least("num_channels", self.num_channels, 1)
        check_at_least("crop_padding", self.crop_padding, 0)
        if self.image_size is not None:
            check_at_least("image_size", self.image_size, 1)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.num_channels):
                raise ValueError(
                    f"{name}: got {len(values)} values {tuple(values)!r}; "
                    f"allowed: 1 or {self.num_channels} (one per channel)"
                )
        for i, value in enumerate(self.std):
            check_positive(f"std[{i}]", value)

    def __call__(
        self, images: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if train:
            x = random_crop(x, self.crop_padding, generator)
            if self.horizontal_flip:
                x = random_horizontal_flip(x, generator)
        x = match_channels(x, self.num_channels)
        if self.image_size is not None:
            x = resize(x, self.image_size)
        mean = self.mean * self.num_channels if len(self.mean) == 1 else self.mean
        std = self.std * self.num_channels if len(self.std) == 1 else self.std
        return normalize(x, mean, std)
