"""Ulysses sequence parallelism for an unchanged `WanDiT` (spec `parallel.md`).

`apply_ulysses(model, group)` patches one model instance from outside:

- `model.forward` (per instance) patchifies, pads the tokens with zero rows to a multiple of
  `sp`, keeps this rank's contiguous chunk for the whole block stack, builds the RoPE rows of
  the chunk's *global* positions, runs the blocks and the head on the chunk, and all-gathers
  the head outputs along the sequence before unpatchify (which drops the padding).
- every block's `self_attn.attend` (per instance) turns the chunk's `[B, S/sp, N, d]` q, k, v
  into `[B, S, N/sp, d]` with one all-to-all (scatter heads, gather sequence), attends over
  the whole sequence with the key-length limit L (real tokens), and sends the result back
  with a second all-to-all.

Cross-attention, FFN, norms and modulation are token-local and run unchanged on the chunk;
the 512 context rows and the time embedding are replicated. The model file knows nothing of
this: the single-device model is the specification, and `remove_ulysses` undoes the patch.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import kernels


# --------------------------------------------------------------------------- all-to-alls
def _all_to_all(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Exchange the leading dim of `x` (size sp): slice i goes to rank i, and slice i of the
    result came from rank i."""
    x = x.contiguous()
    out = torch.empty_like(x)  # (after contiguous: empty_like keeps the strides of its input)
    dist.all_to_all_single(out, x, group=group)
    return out


def sequence_to_heads(x: torch.Tensor, sp: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """`[..., S/sp, N, d]` (this rank's tokens, all heads) -> `[..., S, N/sp, d]` (all tokens,
    this rank's heads). Leading dims (batch, or q/k/v stacked) are carried along."""
    *lead, chunk, heads, dim = x.shape
    # [..., s, sp, N/sp, d] -> [sp, ..., s, N/sp, d]: head group i goes to rank i
    parts = x.reshape(*lead, chunk, sp, heads // sp, dim).movedim(-3, 0)
    gathered = _all_to_all(parts, group)  # [sp (source rank = sequence chunk), ..., s, N/sp, d]
    return gathered.movedim(0, -4).reshape(*lead, sp * chunk, heads // sp, dim)


def heads_to_sequence(x: torch.Tensor, sp: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Inverse of `sequence_to_heads`: `[..., S, N/sp, d]` -> `[..., S/sp, N, d]`."""
    *lead, seq, heads, dim = x.shape
    # [..., sp, s, N/sp, d] -> [sp, ..., s, N/sp, d]: sequence chunk i goes back to rank i
    parts = x.reshape(*lead, sp, seq // sp, heads, dim).movedim(-4, 0)
    gathered = _all_to_all(parts, group)  # [sp (source rank = head group), ..., s, N/sp, d]
    return gathered.movedim(0, -3).reshape(*lead, seq // sp, sp * heads, dim)


def make_ulysses_attend(head_dim: int, sp: int, group: Optional[dist.ProcessGroup]):
    """An `attend(q, k, v, k_lens)` replacement for one `SelfAttention`: inputs and output are
    this rank's `[B, S/sp, N, d]`; attention itself sees all S tokens for N/sp heads."""
    scale = head_dim ** -0.5

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: Optional[torch.Tensor]) -> torch.Tensor:
        # q, k, v travel in one all-to-all ([3, B, S/sp, N, d]); same bytes as three, fewer calls.
        q_all, k_all, v_all = sequence_to_heads(torch.stack((q, k, v)), sp, group).unbind(0)
        out = kernels.attention(q_all, k_all, v_all, scale=scale, k_lens=k_lens)  # [B, S, N/sp, d]
        return heads_to_sequence(out, sp, group)

    return attend


def gather_sequence(x: torch.Tensor, sp: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """`[B, S/sp, C]` chunks of every rank -> `[B, S, C]` in rank order."""
    parts = [torch.empty_like(x) for _ in range(sp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- the model patch
def _ulysses_forward(self, x: torch.Tensor, t, context, y: torch.Tensor, seq_len: Optional[int] = None) -> torch.Tensor:
    """`WanDiT.forward` with the token sequence split over the Ulysses group (same contract)."""
    sp, rank, group = self._ulysses_size, self._ulysses_rank, self._ulysses_group
    inputs = self.embed_inputs(x, t, context, y, seq_len, seq_multiple=sp)  # every rank gets an equal chunk
    chunk = inputs.seq_len // sp
    start, end = rank * chunk, (rank + 1) * chunk
    local = inputs.padded_tokens(start, end)  # this rank's rows, without building the padded whole
    cos, sin = self.rope_tables(inputs.grid, inputs.seq_len, local.device, start=start, end=end)  # global positions
    out = gather_sequence(self.run_blocks(local, inputs, cos, sin), sp, group)  # [B, seq_len, out * 4]
    return self.finish(out, inputs)


def apply_ulysses(model: nn.Module, group: Optional[dist.ProcessGroup]) -> nn.Module:
    """Split `model`'s token sequence over `group` (Ulysses). Patches this instance only.

    Args:
        model: a built `WanDiT` (any device/dtype; may later be wrapped with FSDP).
        group: the Ulysses process group; its size must divide the number of heads.
    Returns:
        the same model, whose `forward` now expects every rank of `group` to call it with
        identical inputs, and returns the full prediction on every rank.
    """
    sp = dist.get_world_size(group)
    heads = model.config.num_heads
    if heads % sp:
        raise ValueError(f"ulysses size {sp} must divide the {heads} attention heads")
    model._ulysses_size, model._ulysses_rank, model._ulysses_group = sp, dist.get_rank(group), group
    for block in model.blocks:
        block.self_attn.attend = make_ulysses_attend(block.self_attn.head_dim, sp, group)
    model.forward = types.MethodType(_ulysses_forward, model)
    return model


def remove_ulysses(model: nn.Module) -> nn.Module:
    """Undo `apply_ulysses` (back to the single-device forward)."""
    for block in model.blocks:
        block.self_attn.__dict__.pop("attend", None)
    model.__dict__.pop("forward", None)
    for name in ("_ulysses_size", "_ulysses_rank", "_ulysses_group"):
        model.__dict__.pop(name, None)
    return model
