"""Input images: a path, bytes, PIL image, numpy array or torch tensor (`image_input`) -> RGB,
EXIF orientation applied; then a float tensor in [-1, 1].

Decoding is faithful or refused, never silently wrong:
- Every mode with transparency (RGBA, LA, La, RGBa, PA, P/L/RGB with a `transparency` key) is
  composited onto one background, opaque white (`BACKGROUND`), so hidden colour under
  transparent pixels never shows.
- High-bit-depth modes are scaled by their real range: `I;16*` by 65535; `I` (32-bit int) by
  the smallest of 8/16/32 bits that holds its maximum (PIL opens 8- and 16-bit data as `I`
  too); `F` (float) in [0, 1] by 1, in [0, 255] as is. Negative, NaN/Inf or other float ranges
  are refused with the range found (exit 2).
- Very large images are reduced while decoding: above `REDUCE_ABOVE_PIXELS` a JPEG is decoded
  at 1/2, 1/4 or 1/8 scale (PIL's draft) and any other format is box-reduced by an integer
  factor right after decoding, so memory stays near the decoded image itself (at most PIL's
  decompression-bomb limit) instead of several float copies of it. Above the bomb limit
  (2 x `Image.MAX_IMAGE_PIXELS`, ~179 MP) the image is refused with one line (exit 2).
- Library warnings raised while decoding are re-issued as one `ImageWarning` line each.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidArgument
from .image_input import EncodedImage, ImageLike, normalize_image_input  # noqa: F401 (ImageLike re-exported)

BACKGROUND = (255, 255, 255)
REDUCE_ABOVE_PIXELS = 36_000_000  # e.g. 8000x4500; far more than any output frame needs
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


class ImageWarning(UserWarning):
    """Something PIL noticed while decoding the input image (one line, naming the file)."""


def bomb_limit() -> int:
    """The pixel count above which PIL refuses to decode (its DecompressionBombError)."""
    return 2 * int(Image.MAX_IMAGE_PIXELS or 0) or 2**62


def open_image(image: ImageLike) -> Image.Image:
    """Open and decode `image` fully (so a corrupt file fails here, not mid-run), apply its
    EXIF orientation and convert any mode to RGB (see the module docstring for the rules).
    `image` is anything `image_input.normalize_image_input` accepts (path, bytes, PIL, numpy, torch)."""
    image = normalize_image_input(image)  # -> a PIL image, encoded data or an existing file's path
    if isinstance(image, Image.Image):
        pil, label = image, "the image given"
    elif isinstance(image, EncodedImage):
        label = image.label
        pil = decode_bounded(image.stream, label)
    else:
        label = os.fspath(image)
        pil = decode_bounded(label, label)  # normalize_image_input checked it is a regular file
    try:
        pil = ImageOps.exif_transpose(pil)
    except Exception:  # a malformed EXIF block should not stop the run; orientation stays as stored
        pass
    if pil.width < 1 or pil.height < 1:
        raise InvalidArgument("image", f"{label}: image has no pixels")
    return to_rgb(pil, label)


def decode_bounded(source: Any, label: str) -> Image.Image:
    """Decode an image file (a path or a binary stream) fully, reduced while decoding when very
    large and refused above the bomb limit (module docstring); `label` names it in messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(source) as handle:
                pil = _load_bounded(handle, label)
        except Image.DecompressionBombError:
            raise InvalidArgument("image", f"{label}: too many pixels to decode safely (above PIL's decompression-"
                                 f"bomb limit of {bomb_limit() / 1e6:.0f} MP); downscale it first") from None
        except InvalidArgument:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = " ".join(str(exc).split())[:120]
            raise InvalidArgument("image", f"{label}: not a readable image ({type(exc).__name__}: {reason})") from None
    for item in caught:
        if issubclass(item.category, Image.DecompressionBombWarning):
            continue  # handled: large images are reduced while decoding
        warnings.warn(ImageWarning(f"image: {label}: {' '.join(str(item.message).split())}"), stacklevel=3)
    return pil


def _load_bounded(handle: Image.Image, label: str) -> Image.Image:
    """Decode `handle` (opened, not loaded), reduced when it is very large; keeps info + EXIF."""
    width, height = handle.size
    if width * height > bomb_limit():
        raise Image.DecompressionBombError(f"{width}x{height}")
    factor = reduction_factor(width, height)
    if factor > 1 and handle.format == "JPEG":
        handle.draft(handle.mode, (math.ceil(width / factor), math.ceil(height / factor)))
    handle.load()
    pil = handle.copy()
    pil.info.update(handle.info)
    exif = handle.getexif()
    if exif:
        pil.info["exif"] = exif.tobytes()
    remaining = reduction_factor(*pil.size)
    if remaining > 1:
        try:
            pil = pil.reduce(remaining)
        except ValueError:  # modes reduce() lacks (e.g. P): resize with the same box filter
            pil = pil.convert("RGBA" if _has_alpha(pil) else "RGB")
            pil = pil.reduce(remaining)
        pil.info.update(handle.info)
        if exif:
            pil.info["exif"] = exif.tobytes()
    return pil


def reduction_factor(width: int, height: int) -> int:
    """The smallest integer factor bringing `width x height` to at most REDUCE_ABOVE_PIXELS."""
    pixels = width * height
    if pixels <= REDUCE_ABOVE_PIXELS:
        return 1
    return math.ceil(math.sqrt(pixels / REDUCE_ABOVE_PIXELS))


def _has_alpha(pil: Image.Image) -> bool:
    return pil.mode in _ALPHA_MODES or "transparency" in pil.info


def to_rgb(pil: Image.Image, label: str = "image") -> Image.Image:
    """Any PIL mode -> RGB: transparency onto `BACKGROUND`, high-bit-depth modes by their range."""
    if pil.mode in ("F", "I") or pil.mode.startswith("I;16"):
        pil = Image.fromarray(_scaled_to_uint8(pil, label))  # grey ("L")
    if pil.mode in ("La", "RGBa"):  # premultiplied: colour + (1 - alpha) * background
        values = np.asarray(pil, dtype=np.float64)
        colour = np.repeat(values[..., :1], 3, axis=-1) if pil.mode == "La" else values[..., :3]
        alpha = values[..., -1:] / 255.0
        composite = colour + (1.0 - alpha) * np.asarray(BACKGROUND, dtype=np.float64)
        return Image.fromarray(np.round(composite).clip(0, 255).astype(np.uint8), "RGB")
    if _has_alpha(pil):
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return pil.convert("RGB")
    except ValueError as exc:
        raise InvalidArgument("image", f"{label}: mode {pil.mode} cannot be converted to RGB ({exc})") from None


def _scaled_to_uint8(pil: Image.Image, label: str) -> np.ndarray:
    """`F`, `I`, `I;16*` pixels -> uint8 by the mode's real range (or an InvalidArgument naming `image`)."""
    values = np.asarray(pil)
    if pil.mode.startswith("I;16"):
        return np.round(values.astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)
    values = values.astype(np.float64)
    if values.size == 0:
        raise InvalidArgument("image", f"{label}: image has no pixels")
    low, high = float(np.min(values)), float(np.max(values))
    if pil.mode == "F":
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InvalidArgument("image", f"{label}: float image holds NaN or Inf values")
        if low >= 0 and high <= 1:
            scale = 1.0
        elif low >= 0 and high <= 255:
            scale = 255.0
        else:
            raise InvalidArgument("image", f"{label}: float image values span [{low:g}, {high:g}]; "
                                 "expected [0, 1] or [0, 255]")
        return np.round(values / scale * 255.0).clip(0, 255).astype(np.uint8)
    if low < 0:
        raise InvalidArgument("image", f"{label}: 32-bit integer image has negative values (min {low:g})")
    bits = next(b for b in (8, 16, 32) if high <= 2**b - 1)  # PIL stores 8/16-bit data as I too
    return np.round(values / (2**bits - 1) * 255.0).clip(0, 255).astype(np.uint8)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 `[3, H, W]` in [-1, 1] (`x / 255 * 2 - 1`, as the reference)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(255.0).mul(2.0).sub(1.0)
