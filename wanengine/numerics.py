"""Non-finite values: the check after decoding and the hint every NaN/Inf message ends with.

The denoising loop checks every latent (`pipeline.denoise`); the decoded video is checked
here, so NaN/Inf in the VAE weights are an error naming the stage, not a garbage video. The
hint depends on what can cause it at that stage and dtype: float16 overflows, while a
float32/bfloat16 run points at the weights (or the input) themselves.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .errors import NumericalError


def nonfinite_hint(dtype: str, stage: str) -> str:
    if dtype == "float16":
        return "float16 overflows in this model; use the bfloat16 dtype (or float32)"
    weights = "the VAE weights (Wan2.1_VAE.pth)" if stage.startswith("VAE") else "the checkpoint's weights"
    return (f"in {dtype} this is not an overflow: {weights} or the input probably hold NaN/Inf "
            "(check the files; `wanengine info` lists them)")


def check_finite(tensor: torch.Tensor, stage: str, dtype: str) -> None:
    """Raise NumericalError naming `stage` if `tensor` holds NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise NumericalError(f"non-finite values (NaN/Inf) in the output of {stage}; {nonfinite_hint(dtype, stage)}")


@contextlib.contextmanager
def hinted(dtype: str, stage: str) -> Iterator[None]:
    """Re-raise a NumericalError from inside the block with the hint for `dtype` and `stage`."""
    try:
        yield
    except NumericalError as exc:
        raise NumericalError(f"{exc}; {nonfinite_hint(dtype, stage)}") from None
