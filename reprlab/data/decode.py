"""One image -> uint8 pixels: the one decoder of every image-file source (folders, file lists, tar shards).

torchvision.io decodes (JPEG, PNG, WebP, GIF), PIL the rest (BMP, TIFF); EXIF orientation is applied and grey,
palette, CMYK, RGBA and 16-bit images become 8-bit RGB (or grey), so every loader sees the same pixels.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor


class SupportsReadBytes(Protocol):
    """An image that is not a file of its own (a member of a tar shard), read whole by ``read_bytes()``."""

    def read_bytes(self) -> bytes: ...


def preload() -> None:
    """Import the decoders in this process before DataLoader workers fork from it: a worker would otherwise
    import torchvision itself when it decodes its first image, seconds on a small machine, every epoch."""
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401


def _to_uint8(image: Tensor) -> Tensor:
    """16-bit samples (16-bit PNG) -> uint8, rounded."""
    if image.dtype == torch.uint8:
        return image
    return torch.div(image.to(torch.int32) * 255 + 32767, 65535, rounding_mode="floor").to(torch.uint8)


def _read_pil(source: Path | io.BytesIO, channels: int) -> Tensor:
    """The formats torchvision.io does not read (BMP, TIFF, ...), EXIF orientation applied."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(source) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey (PIL opens it as I or I;16)
            array = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
            array = ((array * 255 + 32767) // 65535).astype(np.uint8)
            array = np.repeat(array[..., None], channels, axis=2)
        else:
            array = np.array(image.convert("RGB" if channels == 3 else "L"))
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def read_image(path: str | Path | SupportsReadBytes, channels: int = 3) -> Tensor:
    """One image file -> uint8 (channels, H, W): EXIF orientation applied; grey, palette, CMYK, RGBA and 16-bit
    images converted (alpha dropped); an animated GIF gives its first frame. Raises on unreadable files.
    ``path`` may also be anything with ``read_bytes()`` (a member of a tar shard: reprlab.data.shards)."""
    if isinstance(path, (str, os.PathLike)):
        from torchvision.io import read_file

        with warnings.catch_warnings():  # torchvision 0.29 warns on every call that torchcodec supersedes it
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
            return image_from_bytes(read_file(str(path)), channels)
    return image_from_bytes(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), channels)


def image_from_bytes(data: Tensor, channels: int = 3) -> Tensor:
    """The encoded bytes of one image file (uint8 (N,)) -> uint8 (channels, H, W), as :func:`read_image`."""
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    with warnings.catch_warnings():  # torchvision 0.29 warns on every call that torchcodec supersedes it
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
        try:
            image = decode_image(data, mode=mode, apply_exif_orientation=True)
        except RuntimeError:
            if data[:2].tolist() in ([0x42, 0x4D], [0x49, 0x49], [0x4D, 0x4D]):  # BMP, TIFF: not in torchvision.io
                return _read_pil(io.BytesIO(data.numpy().tobytes()), channels)
            raise
    if image.ndim == 4:
        image = image[0]
    return _to_uint8(image)


def decode_file(path: str | Path | SupportsReadBytes, size: int, channels: int = 3) -> Tensor:
    """One image file -> uint8 (channels, size, size): shorter side resized to ``size`` (antialiased), then
    the central square: how both folder loaders prepare images. Raises on unreadable files."""
    return fit_square(read_image(path, channels), size)


def fit_square(image: Tensor, size: int) -> Tensor:
    """uint8 (C, H, W) -> (C, size, size): shorter side resized to ``size`` (antialiased), the central square."""
    from torchvision.transforms.v2.functional import center_crop, resize

    return center_crop(resize(image, size, antialias=True), [size, size])
