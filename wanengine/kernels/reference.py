"""Reference kernels: plain torch math in float32, the accuracy baseline of every backend.

Each function here defines the semantics that the `cuda` and `npu` implementations must
reproduce; tests compare them against these. Shapes use `[B, S, N, D]` (batch, sequence,
heads, head dim).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, k_lens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v over `[B, S, N, D]`; keys at index >= k_lens[b] are masked out."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, N, S, D]
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, N, Sq, Sk]
    if k_lens is not None:
        key_pos = torch.arange(k.shape[1], device=k.device)
        masked = key_pos[None, :] >= k_lens.to(k.device)[:, None]  # [B, Sk]
        scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), vf)
    return out.transpose(1, 2).to(q.dtype)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Pairwise (x0, x1) -> (-x1, x0) along the last dim: the imaginary-unit multiply."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pairs rotation `x * cos + rot(x) * sin`; cos/sin repeat each angle twice."""
    xf = x.float()
    return (xf * cos.float() + rotate_interleaved(xf) * sin.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x * rsqrt(mean(x^2) + eps))`, normalised in float32 and cast back first."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Affine LayerNorm over the last dim, normalised in float32 and cast back first."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    if weight is not None:
        normed = normed * weight
    if bias is not None:
        normed = normed + bias
    return normed


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """`LN(x) * (1 + scale) + shift` with a parameter-free LN; float32 math, result in x's dtype."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (normed * (1 + scale.float()) + shift.float()).to(x.dtype)


def linear8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """8-bit linear by dequantizing just before the matmul: `W = qweight.float() * scale` in float32,
    cast to x's dtype, then `F.linear`. In float32 this is exactly the layer with the dequantized
    weight stored in full precision (the accuracy baseline of every 8-bit path)."""
    from ..quant.schemes import dequantize

    weight = dequantize(qweight, scale, x.dtype)
    return F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)
