"""Batching: pad uint8 images bottom/right to a common size divisible by 32."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .decode import EncodedBatch, EncodedImage

__all__ = ["collate", "pad_images"]


def pad_images(images: Sequence[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
    """Stack ``[3, h_i, w_i]`` images into ``[B, 3, H, W]``, zero-padded on the bottom/right.

    ``H``/``W`` are the batch maxima rounded up to a multiple of ``size_divisible`` (the FPN's
    coarsest stride). The detector normalises uint8 batches itself and sets the padding to 0
    after normalising (the mean colour), given each image's ``image_size``.

    Decoded and resized images are channels-last in memory (``[h, w, 3]`` bytes); a uint8 batch keeps
    that layout when the first image has it, so padding is a row copy instead of a transpose (4x
    cheaper on the CPU); the detector makes its normalised input contiguous on the device. Float
    batches are contiguous, as the model has always received them.
    """
    if not images:
        raise ValueError("cannot collate an empty batch")
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    h = int(math.ceil(h / size_divisible) * size_divisible)
    w = int(math.ceil(w / size_divisible) * size_divisible)
    channels_last = images[0].dtype == torch.uint8 and images[0].permute(1, 2, 0).is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((len(images), images[0].shape[0], h, w), dtype=images[0].dtype, device=images[0].device,
                      memory_format=layout)
    for i, im in enumerate(images):
        ih, iw = im.shape[-2:]
        out[i, :, :ih, :iw].copy_(im)
        out[i, :, :ih, iw:].zero_()  # zero the padding only, not the whole batch first
        out[i, :, ih:].zero_()
    return out


def collate(batch: Sequence[tuple[torch.Tensor, dict]], size_divisible: int = 32):
    """``[(image, target), ...]`` -> ``(images uint8 Tensor[B, 3, H, W], [target, ...])``.

    Samples of a ``gpu_decode`` dataset give an :class:`EncodedBatch` in place of the tensor; its
    ``.to(device)`` makes the same uint8 batch on the device.
    """
    images, targets = zip(*batch)
    if isinstance(images[0], EncodedImage):
        return EncodedBatch(images, size_divisible), list(targets)
    return pad_images(images, size_divisible), list(targets)
