"""The reference release's execution of the DiT and UMT5, put back on top of wanengine's models,
so that benchmarks can time "the reference design" against the optimised defaults in the same
run on the same weights (clean-room: written from `spec/dit.md`, not from the reference code).

What the reference design does that wanengine does not (spec `dit.md`, "Forward" and "3-D
rotary position embedding"; spec `t5.md`):

- the time embedding (`time_embedding` + `time_projection`, a `[D, 6D]` linear) is evaluated
  once per *token*, so every block's modulation is a `[B, L, 6, D]` float32 tensor and every
  modulated LayerNorm / gate reads per-token rows;
- RoPE is recomputed on every call in float64 complex arithmetic (complex128 rotation table,
  token pairs viewed as complex128, multiplied, cast back);
- the text MLP and every block's cross-attention k/v projections run on all 512 padded text
  rows (wanengine runs them on the prompt rows plus the one row all padding embeds to);
- UMT5 runs over all 512 padded positions.

`apply_reference_design(model)` patches one `WanDiT` instance (its weights are untouched, the
result equals the optimised forward up to float32 summation order); `remove_reference_design`
undoes it. `encode_all_positions` is a drop-in `UMT5Encoder.encode`.
"""
from __future__ import annotations

import types
from typing import List, Optional

import torch
import torch.nn.functional as F

from wanengine.models.dit import WanDiT, sinusoidal_embedding


# --------------------------------------------------------------------------- RoPE, the reference way
def rope_float64_complex(x: torch.Tensor, grid, num_tokens: int) -> torch.Tensor:
    """`x [B, S, N, d]` with the first `num_tokens` rows rotated by complex128 tables built here,
    on every call (the reference's `rope_apply`); padding rows pass through."""
    f, h, w = grid
    d = x.shape[-1]
    c = d // 2
    pairs = (c - 2 * (c // 3), c // 3, c // 3)
    tables = []
    for count, n in zip(pairs, (f, h, w)):
        exponents = torch.arange(0, 2 * count, 2, dtype=torch.float64, device=x.device) / (2 * count)
        inv = 1.0 / torch.pow(10000.0, exponents)
        angles = torch.outer(torch.arange(n, dtype=torch.float64, device=x.device), inv)
        tables.append(torch.polar(torch.ones_like(angles), angles))  # complex128 [n, count]
    freqs = torch.cat([tables[0][:, None, None].expand(f, h, w, -1), tables[1][None, :, None].expand(f, h, w, -1),
                       tables[2][None, None, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, c)
    out = x.clone()
    real = x[:, :num_tokens].to(torch.float64).reshape(x.shape[0], num_tokens, x.shape[2], c, 2)
    rotated = torch.view_as_real(torch.view_as_complex(real) * freqs).flatten(3)
    out[:, :num_tokens] = rotated.to(x.dtype)
    return out


# --------------------------------------------------------------------------- one block, the reference way
def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def reference_block(block, x: torch.Tensor, e0_tokens: torch.Tensor, text: torch.Tensor, grid,
                    num_tokens: int, k_lens: torch.Tensor) -> torch.Tensor:
    """One DiT block with a per-token `e0_tokens [B, S, 6, D]` modulation and per-call float64 RoPE."""
    mod = (block.modulation.float().unsqueeze(1) + e0_tokens).unbind(2)  # six [B, S, D]
    shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod
    sa = block.self_attn
    a = _layer_norm(x, block.eps) * (1 + scale_msa) + shift_msa
    a = a.to(sa.q.weight.dtype)
    heads = (x.shape[0], x.shape[1], sa.num_heads, sa.head_dim)
    q = rope_float64_complex(sa.norm_q(sa.q(a)).view(heads), grid, num_tokens)
    k = rope_float64_complex(sa.norm_k(sa.k(a)).view(heads), grid, num_tokens)
    v = sa.v(a).view(heads)
    x = x + sa.o(sa.attend(q, k, v, k_lens).flatten(2)).float() * gate_msa
    x = x + block.cross_attn(block.norm3(x).to(block.cross_attn.q.weight.dtype), text).float()
    b = (_layer_norm(x, block.eps) * (1 + scale_ffn) + shift_ffn).to(block.ffn[0].weight.dtype)
    return x + block.ffn(b).float() * gate_ffn


def _reference_forward(self: WanDiT, x, t, context, y, seq_len: Optional[int] = None) -> torch.Tensor:
    unbatched = x.dim() == 4
    if unbatched:
        x, y = x[None], y[None]
    tokens, grid = self.patchify(x, y)  # [B, L, D]
    bsz, num_tokens, dim = tokens.shape
    seq = num_tokens if seq_len is None else int(seq_len)
    if seq > num_tokens:
        tokens = torch.cat((tokens, tokens.new_zeros(bsz, seq - num_tokens, dim)), dim=1)
    text = self.embed_text(context)  # the MLP on all text_len rows, [B, 512, D]
    # Time embedding once per token: [B * S] timesteps -> e [B, S, D], e0 [B, S, 6, D].
    per_token_t = torch.as_tensor(t).reshape(-1).float().expand(bsz)[:, None].expand(bsz, seq).reshape(-1)
    emb = sinusoidal_embedding(per_token_t, self.config.freq_dim).to(tokens.device)
    e = self.time_embedding(emb.to(self.time_embedding[0].weight.dtype)).float()
    e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
    e, e0 = e.view(bsz, seq, dim), e0.view(bsz, seq, 6, dim)
    k_lens = torch.full((bsz,), num_tokens, dtype=torch.int32)
    for block in self.blocks:
        tokens = reference_block(block, tokens, e0, text, grid, num_tokens, k_lens)
    head = self.head
    shift, scale = (head.modulation.float().unsqueeze(1) + e.unsqueeze(2)).unbind(2)  # [B, S, D] each
    z = (_layer_norm(tokens, head.eps) * (1 + scale) + shift).to(head.head.weight.dtype)
    video = self.unpatchify(head.head(z).float(), grid)
    return video[0] if unbatched else video


def apply_reference_design(model: WanDiT) -> WanDiT:
    """Patch this instance's forward to the reference design's execution (see the module docstring)."""
    model.forward = types.MethodType(_reference_forward, model)
    return model


def remove_reference_design(model: WanDiT) -> WanDiT:
    model.__dict__.pop("forward", None)
    return model


# --------------------------------------------------------------------------- UMT5 over all positions
def encode_all_positions(self, ids: torch.Tensor, mask: torch.Tensor) -> List[torch.Tensor]:
    """`UMT5Encoder.encode` the reference way: all padded positions, then the prompt rows."""
    lengths = [int(n) for n in mask.sum(dim=1).tolist()]
    with torch.no_grad():
        out = self.forward(ids, mask)  # [B, 512, D]
    return [out[i, :n] for i, n in enumerate(lengths)]
