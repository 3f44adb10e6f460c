"""Image decoding: JPEG with ``torchvision.io.decode_jpeg`` (PIL for anything else), on the CPU or,
batched, on a GPU.

CPU decoding happens in the dataset (:func:`read_image`). With ``DataConfig.gpu_decode`` the dataset
yields :class:`EncodedImage` items instead (the file's bytes plus the resize/flip already drawn), the
collate makes an :class:`EncodedBatch`, and ``batch.to("cuda")`` decodes the whole batch with nvJPEG,
resizes, flips and pads it there: the training loop's ``images.to(device)`` stays as it is.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .transforms import resize_flip

__all__ = ["read_image", "read_bytes", "decode_bytes", "is_jpeg", "EncodedImage", "EncodedBatch"]

_JPEG_SOI = b"\xff\xd8\xff"
# torchvision 0.29 warns on every call that torchcodec supersedes its image codecs; its decode_jpeg
# still is the fast path here (and the only one on torch 2.11 GPU nodes), so say it once, in docs/data.md.
_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


def _decode_jpeg(data, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CODEC_DEPRECATION, category=DeprecationWarning)
        return decode_jpeg(data, **kw)


def read_bytes(path: str | os.PathLike) -> torch.Tensor:
    """The file as a uint8 ``[n]`` tensor; ``FileNotFoundError`` naming it when absent."""
    try:
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None


def is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 3 and bytes(data[:3].tolist()) == _JPEG_SOI


def _decode_pil(data: torch.Tensor, path) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot decode image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_bytes(data: torch.Tensor, path: str | os.PathLike = "<bytes>") -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB ``[3, h, w]`` on the CPU; ``OSError`` naming ``path``.

    JPEG goes through libjpeg-turbo in torchvision (about 1.4x faster than PIL here, same pixels);
    what it cannot read (PNG, CMYK or otherwise unusual JPEGs, truncated files) goes to PIL, so the
    accepted formats and the errors stay PIL's.
    """
    if is_jpeg(data):
        try:
            return _decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL either reads it or raises the error the dataset reports
    return _decode_pil(data, path)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to uint8 RGB ``[3, h, w]``; raises ``OSError`` naming the file."""
    return decode_bytes(read_bytes(path), path)


@dataclass
class EncodedImage:
    """A sample whose pixels are made on the device: JPEG ``data`` (uint8 ``[n]``) or, for a file the
    GPU decoder does not take, the CPU-made uint8 ``image`` ``[3, h, w]`` (already resized/flipped).

    ``geometry`` is ``(h, w, scale, flipped)`` from :meth:`DetectionTransform.geometry`.
    """

    geometry: tuple[int, int, float, bool]
    data: Optional[torch.Tensor] = None
    image: Optional[torch.Tensor] = None
    path: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.geometry[0], self.geometry[1])


class EncodedBatch:
    """A batch of :class:`EncodedImage`; ``.to(device)`` returns the padded uint8 ``[B, 3, H, W]``.

    JPEGs are decoded in one batched ``decode_jpeg(..., device=device)`` call (nvJPEG on CUDA),
    resized and flipped there, and padded with zeros to a multiple of ``size_divisible``, like
    :func:`pipeline.data.batching.pad_images` does on the host.
    """

    def __init__(self, items: Sequence[EncodedImage], size_divisible: int = 32):
        if not items:
            raise ValueError("cannot collate an empty batch")
        self.items = list(items)
        self.size_divisible = size_divisible

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        d = self.size_divisible
        h = max(it.geometry[0] for it in self.items)
        w = max(it.geometry[1] for it in self.items)
        return (len(self.items), 3, int(math.ceil(h / d) * d), int(math.ceil(w / d) * d))

    def pin_memory(self, device=None) -> "EncodedBatch":
        for it in self.items:
            if it.data is not None:
                it.data = it.data.pin_memory()
        return self

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        jpeg = [i for i, it in enumerate(self.items) if it.data is not None]
        decoded: dict[int, torch.Tensor] = {}
        if jpeg:
            datas = [self.items[i].data for i in jpeg]
            try:
                # The CPU decoder takes the tensors as they are; batched nvJPEG wants them on the host too.
                outs = _decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                outs = [decode_bytes(d, self.items[i].path).to(device) for i, d in zip(jpeg, datas)]
            decoded = dict(zip(jpeg, outs))
        out = torch.zeros(self.shape, dtype=torch.uint8, device=device)
        for i, it in enumerate(self.items):
            img = decoded[i] if i in decoded else it.image.to(device, non_blocking=non_blocking)
            if i in decoded:
                img = resize_flip(img, it.geometry)
            out[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
        return out
