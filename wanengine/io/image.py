"""Input images: a path, bytes, PIL image, numpy array or torch tensor -> RGB float tensor in
[-1, 1], EXIF orientation applied (the accepted inputs: `image_input`)."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserInputError
from .image_input import ImageLike, normalize_image_input  # noqa: F401 (ImageLike re-exported)


def open_image(image: ImageLike) -> Image.Image:
    """Open and decode `image` fully (so a corrupt file fails here, not mid-run), apply its
    EXIF orientation and convert any mode (L, P, RGBA, CMYK, I;16, ...) to RGB. `image` is
    anything `image_input.normalize_image_input` accepts (path, bytes, PIL, numpy, torch)."""
    image = normalize_image_input(image)  # -> a PIL image or an existing file's path
    if isinstance(image, Image.Image):
        pil = image
        label = "image"
    else:
        label = os.fspath(image)
        if not os.path.isfile(label):
            raise UserInputError(f"--image: {label}: file not found")
        try:
            with Image.open(label) as handle:
                handle.load()
                pil = handle.copy()
                pil.info.update(handle.info)
                exif = handle.getexif()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UserInputError(f"--image: {label}: not a readable image ({type(exc).__name__}: {str(exc)[:120]})") from None
        if exif:
            pil.info["exif"] = exif.tobytes()
    try:
        pil = ImageOps.exif_transpose(pil)
    except Exception:  # a malformed EXIF block should not stop the run; orientation stays as stored
        pass
    if pil.mode == "RGBA" or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pil = Image.alpha_composite(background, rgba)  # transparent pixels become white, not black
    elif pil.mode in ("I;16", "I;16B", "I;16L", "I"):
        pil = Image.fromarray((np.asarray(pil, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if pil.width < 1 or pil.height < 1:
        raise UserInputError(f"--image: {label}: image has no pixels")
    return pil.convert("RGB")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 `[3, H, W]` in [-1, 1] (`x / 255 * 2 - 1`, as the reference)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(255.0).mul(2.0).sub(1.0)
