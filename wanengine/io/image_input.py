"""What the library accepts as an input image, brought to one of three forms before decoding:
a PIL image, encoded data (`EncodedImage`), or the path of an image file; `io.image` decodes
the last two with one bounded decoder (large images reduced while decoding, bombs refused).

Accepted: a path (`str` / `os.PathLike`), encoded file bytes (`bytes`, `bytearray`,
`memoryview`) or a binary file object (anything with `.read()`), a PIL image, a numpy array
and a torch tensor.

Arrays: `[H, W]` (grey), `[H, W, C]` with C = 1, 3 or 4 (RGBA: alpha is composited on white
later); torch tensors may also be channel-first `[C, H, W]` or `[1, C, H, W]` (the
torchvision layout). Integer arrays are 0..255 (`uint8`) or 0..65535 (`uint16`); floating
arrays are in [0, 1] -- a [-1, 1] tensor is rejected with a hint rather than guessed at.
Every problem is an `InvalidArgument` naming `image`.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from ..errors import InvalidArgument

if TYPE_CHECKING:  # torch stays a lazy import here
    import torch

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray, "torch.Tensor"]


@dataclass(frozen=True)
class EncodedImage:
    """Encoded image data (bytes or a binary file object) still to be decoded -- by the same
    bounded decoder as a file (`io.image.decode_bounded`) -- and how messages name it."""

    stream: Any
    label: str


def normalize_image_input(image: Any) -> Union[Image.Image, EncodedImage, str]:
    """`image` (see the module docstring) -> a PIL image, encoded data or an existing file's path."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        from .file_kinds import not_a_file_reason

        problem = not_a_file_reason(path)  # "file not found", "is a directory, not a regular file", ...
        if problem is not None:
            raise InvalidArgument("image", f"{path}: {problem}")
        return path
    if isinstance(image, (bytes, bytearray, memoryview)):
        return EncodedImage(io.BytesIO(bytes(image)), "the bytes given")
    if hasattr(image, "read"):
        return EncodedImage(image, "the file object given")
    if isinstance(image, np.ndarray):
        return array_to_pil(image, channels_first=False)
    if type(image).__module__.split(".")[0] == "torch":  # a torch.Tensor, without importing torch
        array = image.detach().cpu()
        if array.dtype.is_floating_point:
            array = array.float()
        return array_to_pil(array.numpy(), channels_first=True)
    raise InvalidArgument("image", f"unsupported type {type(image).__name__}; give a path, bytes, a PIL image, "
                                   "a numpy array or a torch tensor")


def array_to_pil(array: np.ndarray, channels_first: bool) -> Image.Image:
    """An image array (layouts and ranges as in the module docstring) -> a PIL image."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if channels_first and array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InvalidArgument("image", f"array of shape {tuple(array.shape)} is not an image; expected [H, W], "
                                       "[H, W, 3|4]" + (" or [3|4, H, W]" if channels_first else ""))
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InvalidArgument("image", f"array of shape {tuple(array.shape)} has no pixels")
    return Image.fromarray(_to_uint8(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidArgument("image", "float array contains NaN or Inf")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            hint = "; for a [-1, 1] tensor pass (x + 1) / 2" if low < 0.0 else ""
            raise InvalidArgument("image", f"float values must be in [0, 1], got [{low:.3g}, {high:.3g}]{hint}")
        return (array.astype(np.float64) * 255.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise InvalidArgument("image", f"integer values must be 0..255 (or uint16), got "
                                           f"{array.min()}..{array.max()}")
        return array.astype(np.uint8)
    raise InvalidArgument("image", f"unsupported array dtype {array.dtype}")
