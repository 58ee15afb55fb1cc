"""`Linear8`: a linear layer whose weight stays 8-bit in memory, and `apply_linear8`, which
puts it in place of chosen `nn.Linear`s of an already built model (meta or loaded), so that
`models/*.py` never learn about 8-bit weights.

State (the canonical names every 8-bit format is loaded into, see `detect`):
`bias [out]` (run dtype, optional), `weight [out, in]` int8 / float8_e4m3fn, `weight_scale
[out, 1]` float32 -- all `nn.Parameter`s with `requires_grad=False`, so that FSDP shards them
(dim 0: a rank's weight rows and their scales travel together) and the expert switcher moves
them like any other parameter. The bias is registered FIRST on purpose: the DiT casts a
linear's input to the dtype of the layer's first parameter (`dit._linear_in`), which must be
the run dtype, never the 8-bit storage dtype.

The matmul is `kernels.linear8` (reference: dequantize just before the matmul; cuda: fp8
`_scaled_mm` with per-token activation scales; npu: int8 `npu_quant_matmul`).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .. import kernels
from .schemes import dequantize, is_eight_bit, quantize_rows


class Linear8(nn.Module):
    """`y = x W^T + b` with `W = weight.float() * weight_scale`; output in x's dtype."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, qdtype: torch.dtype,
                 bias_dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        if not is_eight_bit(qdtype):
            raise ValueError(f"Linear8 stores int8 or float8_e4m3fn weights, not {qdtype}")
        self.in_features, self.out_features, self.qdtype = in_features, out_features, qdtype
        if bias:  # first, see the module docstring
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=qdtype, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qdtype: torch.dtype) -> "Linear8":
        """Quantize a loaded `nn.Linear` by the engine's rule (or build an empty one from a meta one)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, qdtype=qdtype,
                    bias_dtype=weight.dtype, device=weight.device)
        if not weight.is_meta:
            q, scale = quantize_rows(weight.detach(), qdtype)
            layer.weight.data, layer.weight_scale.data = q, scale
            if linear.bias is not None:
                layer.bias.data = linear.bias.detach().clone()
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear8(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, qdtype={str(self.qdtype).replace('torch.', '')}")


def apply_linear8(model: nn.Module, layers: Mapping[str, torch.dtype]) -> nn.Module:
    """Replace each named `nn.Linear` of `model` (module name -> 8-bit dtype) by a `Linear8`, in
    place; returns `model`. On a meta-built model the new layers are on meta too (a loader then
    streams the 8-bit tensors in); on a loaded one the weights are quantized now."""
    for name, qdtype in layers.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        current = getattr(owner, leaf)
        if isinstance(current, Linear8):
            continue
        if not isinstance(current, nn.Linear):
            raise TypeError(f"{name} is a {type(current).__name__}, not an nn.Linear")
        setattr(owner, leaf, Linear8.from_linear(current, qdtype))
    return model


def quantizable_linears(model: nn.Module, pattern) -> Dict[str, nn.Linear]:
    """The model's `nn.Linear` modules whose names full-match `pattern` (the block linears)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(name)}


def eight_bit_modules(model: nn.Module) -> Dict[str, Linear8]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear8)}
