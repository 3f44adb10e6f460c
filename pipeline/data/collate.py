"""Batching: pad images bottom/right to a common size divisible by 32."""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["collate", "pad_images"]


def pad_images(images: Sequence[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
    """Stack ``[3, h_i, w_i]`` images into ``[B, 3, H, W]``, zero-padded on the bottom/right.

    ``H``/``W`` are the batch maxima rounded up to a multiple of ``size_divisible`` (the FPN's
    coarsest stride). Zeros are added after normalisation, i.e. padding is the mean colour.
    """
    if not images:
        raise ValueError("cannot collate an empty batch")
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    h = int(math.ceil(h / size_divisible) * size_divisible)
    w = int(math.ceil(w / size_divisible) * size_divisible)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
    return out


def collate(batch: Sequence[tuple[torch.Tensor, dict]], size_divisible: int = 32):
    """``[(image, target), ...]`` -> ``(images Tensor[B, 3, H, W], [target, ...])``."""
    images, targets = zip(*batch)
    return pad_images(images, size_divisible), list(targets)
