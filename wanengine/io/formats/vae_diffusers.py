"""VAE naming table: diffusers' `AutoencoderKLWan` names <-> the released `Wan2.1_VAE.pth`
names (spec `formats.md`, section 1). Pure renames, no reshapes.

Residual blocks (`R`): `norm1.gamma -> residual.0.gamma`, `conv1 -> residual.2`,
`norm2.gamma -> residual.3.gamma`, `conv2 -> residual.6`, `conv_shortcut -> shortcut`.
The decoder's `up_blocks.{i}` hold `resnets.{j}` then one upsampler; flattened, block `i`
starts at `i * (resnets per block + 1)` (4 in the release: `4i + j`, upsampler `4i + 3`).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, List, Tuple

_RESNET: List[Tuple[str, str]] = [  # (diffusers, released) inside one residual block
    ("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
    ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."),
]
_TOP: List[Tuple[str, str]] = [("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")]
_SIDE: List[Tuple[str, str]] = [("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")]
_MARKERS = ("down_blocks.", "up_blocks.", "mid_block.", "quant_conv.", "conv_in.", "conv_out.")

_MID_RESNET = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$")
_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)$")
_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.*)$")
_UP_RESNET = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$")
_UP_SAMPLER = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$")


def _swap(rest: str, rules: Iterable[Tuple[str, str]], to_released: bool) -> str:
    for diffusers, released in rules:
        src, dst = (diffusers, released) if to_released else (released, diffusers)
        if rest.startswith(src):
            return dst + rest[len(src):]
    return rest


def is_diffusers_vae(names: Iterable[str]) -> bool:
    """True when any tensor name is spelled the diffusers way."""
    return any(marker in name for name in names for marker in _MARKERS)


def _up_stride(names: Iterable[str]) -> int:
    """Flattened decoder entries per up block: resnets per block + the upsampler."""
    resnets = [int(m.group(2)) for m in map(_UP_RESNET.match, names) if m]
    return (max(resnets) + 2) if resnets else 4


def to_released_namer(names: Iterable[str]) -> Callable[[str], str]:
    """The renaming function for one diffusers VAE state dict (its up-block stride read off
    its own names); unknown names pass through so the strict check reports them."""
    stride = _up_stride(list(names))

    def rename(name: str) -> str:
        for pattern, build in (
            (_MID_RESNET, lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_swap(m[3], _RESNET, True)}"),
            (_MID_ATTN, lambda m: f"{m[1]}.middle.1.{m[2]}"),
            (_DOWN, lambda m: f"encoder.downsamples.{m[1]}.{_swap(m[2], _RESNET, True)}"),
            (_UP_RESNET, lambda m: f"decoder.upsamples.{stride * int(m[1]) + int(m[2])}.{_swap(m[3], _RESNET, True)}"),
            (_UP_SAMPLER, lambda m: f"decoder.upsamples.{stride * int(m[1]) + stride - 1}.{m[2]}"),
        ):
            match = pattern.match(name)
            if match:
                return build(match)
        side, dot, rest = name.partition(".")
        if side in ("encoder", "decoder") and dot:
            return f"{side}.{_swap(rest, _SIDE, True)}"
        return _swap(name, _TOP, True)

    return rename


def to_diffusers_vae_name(name: str, num_res_blocks: int = 2) -> str:
    """Released VAE name -> diffusers name (the inverse; used to write diffusers copies)."""
    stride = num_res_blocks + 2
    side, _, rest = name.partition(".")
    parts = rest.split(".")
    if side in ("encoder", "decoder") and parts[0] == "middle":
        index, tail = int(parts[1]), ".".join(parts[2:])
        if index == 1:
            return f"{side}.mid_block.attentions.0.{tail}"
        return f"{side}.mid_block.resnets.{index // 2}.{_swap(tail, _RESNET, False)}"
    if side == "encoder" and parts[0] == "downsamples":
        return f"encoder.down_blocks.{parts[1]}.{_swap('.'.join(parts[2:]), _RESNET, False)}"
    if side == "decoder" and parts[0] == "upsamples":
        block, offset = divmod(int(parts[1]), stride)
        tail = ".".join(parts[2:])
        if offset == stride - 1:
            return f"decoder.up_blocks.{block}.upsamplers.0.{tail}"
        return f"decoder.up_blocks.{block}.resnets.{offset}.{_swap(tail, _RESNET, False)}"
    if side in ("encoder", "decoder"):
        return f"{side}.{_swap(rest, _SIDE, False)}"
    return _swap(name, _TOP, False)
