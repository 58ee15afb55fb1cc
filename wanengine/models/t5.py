"""UMT5-XXL text encoder (encoder only) with the released tensor names, and its loader.

The module's attribute names mirror `models_t5_umt5-xxl-enc-bf16.pth` exactly, so the
released state dict loads with `strict=True` and no renaming. The configuration is
inferred from tensor shapes (`T5Config.from_state_dict_shapes`); the released file is
L=24, D=4096, A=4096, Fd=10240, H=64, NB=32, V=256384. Math follows `spec/t5.md`.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from .. import kernels
from ..errors import CheckpointError
from .loading import assign_streaming, check_names_and_shapes, expected_shapes

if TYPE_CHECKING:  # pragma: no cover
    from ..io.formats.component_files import ComponentTensors
    from .tokenizer import Tokenizer

NORM_EPS = 1e-6
# Bidirectional relative-position bucketing constants (spec/t5.md).
MAX_EXACT = 8
MAX_DISTANCE = 128


@dataclass(frozen=True)
class T5Config:
    """Encoder sizes; every field is recoverable from the checkpoint's tensor shapes."""

    vocab_size: int  # V
    dim: int  # D, model width
    dim_attn: int  # A, attention width (all heads together)
    dim_ffn: int  # Fd
    num_heads: int  # H
    num_layers: int  # L
    num_buckets: int  # NB, relative-position buckets

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim_attn % self.num_heads:
            raise ValueError(f"T5Config: dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets % 2:
            raise ValueError(f"T5Config: num_buckets {self.num_buckets} must be even (bidirectional buckets)")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, Sequence[int]], source: str = "T5 checkpoint") -> "T5Config":
        """Infer the sizes from `{tensor name: shape}`; CheckpointError naming `source` and the
        tensor when one needed for the inference is missing or has the wrong rank."""

        def shape_of(name: str, rank: int) -> Tuple[int, ...]:
            if name not in shapes:
                raise CheckpointError(f"{source}: 1 tensor(s) missing, e.g. {name} (needed to infer the encoder size)")
            shape = tuple(int(s) for s in shapes[name])
            if len(shape) != rank:
                raise CheckpointError(f"{source}: tensor {name} has shape {list(shape)}, expected {rank} dimensions")
            return shape

        # Count blocks from names the model defines, so a stray unknown tensor is reported
        # as unexpected by the strict check rather than changing the layer count.
        known = re.compile(r"blocks\.(\d+)\.(?:norm[12]\.weight|attn\.[qkvo]\.weight|ffn\.(?:gate\.0|fc1|fc2)\.weight"
                           r"|pos_embedding\.embedding\.weight)$")
        indices = [int(m.group(1)) for m in map(known.match, shapes) if m]
        if not indices:
            raise CheckpointError(f"{source}: no encoder blocks found (expected tensors named blocks.<i>.*)")

        def vote(*dims: Tuple[str, int]) -> int:
            """Most common size among `(name suffix, axis)` over all blocks, so that one
            mis-shaped tensor is the one the strict shape check names, not its neighbours."""
            sizes = []
            for suffix, axis in dims:
                pattern = re.compile(rf"blocks\.\d+\.{re.escape(suffix)}")
                sizes += [int(shape[axis]) for name, shape in shapes.items()
                          if pattern.fullmatch(name) and len(shape) > axis]
            if not sizes:
                raise CheckpointError(f"{source}: 1 tensor(s) missing, e.g. blocks.0.{dims[0][0]} "
                                      f"(needed to infer the encoder size)")
            return Counter(sizes).most_common(1)[0][0]

        vocab_size, dim = shape_of("token_embedding.weight", 2)
        dim_attn = vote(("attn.q.weight", 0), ("attn.k.weight", 0), ("attn.v.weight", 0), ("attn.o.weight", 1))
        dim_ffn = vote(("ffn.gate.0.weight", 0), ("ffn.fc1.weight", 0), ("ffn.fc2.weight", 1))
        num_buckets = vote(("pos_embedding.embedding.weight", 0))
        num_heads = vote(("pos_embedding.embedding.weight", 1))
        try:
            return cls(vocab_size=vocab_size, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                       num_layers=max(indices) + 1, num_buckets=num_buckets)
        except ValueError as exc:
            raise CheckpointError(f"{source}: inconsistent encoder shapes: {exc}") from exc


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int = 32, max_exact: int = MAX_EXACT,
                             max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """Bidirectional T5 bucket of each relative position `r = key - query` (int64 tensor).

    Keys after the query use buckets [nb, 2 nb), the others [0, nb), with nb = num_buckets / 2;
    distances below `max_exact` get a bucket each, longer ones share log-spaced buckets up
    to `max_distance` and the last bucket beyond it.
    """
    half = num_buckets // 2
    bucket = (rel_pos > 0).long() * half
    distance = rel_pos.abs()
    # float32 log as in the reference: the truncation at exact powers of two (a = 16, 32, 64)
    # depends on the rounding of this expression, so it must be the same expression.
    # clamp_min keeps log() finite on the entries the `where` discards anyway.
    log_ratio = torch.log(distance.clamp_min(max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (log_ratio * (half - max_exact)).long()
    far = far.clamp_max(half - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class Embedding(nn.Embedding):
    """`nn.Embedding` that leaves a meta-device table uninitialised: `normal_` on meta goes
    through torch's Python reference ops, whose first use imports torch._dynamo (1-2 s of
    every preflight and load, and a slower interpreter exit). Checkpoints overwrite it anyway."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def position_buckets(seq_len: int, num_buckets: int, device: Union[str, torch.device]) -> torch.Tensor:
    """`[S, S]` bucket index for query i (row) and key j (column), built on `device`."""
    pos = torch.arange(seq_len, device=device, dtype=torch.long)
    return relative_position_bucket(pos[None, :] - pos[:, None], num_buckets)


class RelativePositionBias(nn.Module):
    """One block's learned bias table, looked up by bucket: `[S, S]` -> `[1, H, S, S]`."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [S, S, H] -> [1, H, S, S]


class T5Norm(nn.Module):
    """RMS norm without mean subtraction (`x * rsqrt(mean(x^2) + eps) * weight`), float32 inside."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The spec casts the normalised value to the weight's dtype; kernels.rms_norm casts to
        # x's dtype. They agree here because the residual stream always carries the weight
        # dtype (embedding, linears and attention all return it).
        return kernels.rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    """Multi-head self-attention with an additive position bias and no 1/sqrt(d) scaling."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x `[B, S, D]`, bias `[1, H, S, S]`, key_mask `[B, S]` (0 = padding) -> `[B, S, D]`."""
        bsz, seqlen, _ = x.shape
        q, k, v = (proj(x).view(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))  # [B, H, S, d]
        # Plain matmul + softmax rather than kernels.attention: that kernel takes no additive
        # bias, and this one needs a per-head position bias plus a float32 softmax (spec).
        # At <= 512 tokens this is cheap next to the projections.
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B, H, S, S], unscaled by design (T5)
        # Padded keys: bias set to the most negative finite value (not -inf, so nothing overflows).
        masked = (key_mask == 0)[:, None, None, :]  # [B, 1, 1, S]
        bias = bias.to(scores.dtype).masked_fill(masked, torch.finfo(scores.dtype).min)
        probs = torch.softmax((scores + bias).float(), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v)  # [B, H, S, d]
        return self.o(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class GatedFeedForward(nn.Module):
    """`fc2(fc1(x) * gelu_tanh(gate(x)))`; `gate` is a Sequential so its weight is `gate.0.weight`."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    """Pre-norm attention and feed-forward, each with a residual, and its own position table."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5Norm(cfg.dim)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5Norm(cfg.dim)
        self.ffn = GatedFeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        bias = self.pos_embedding(buckets)  # [1, H, S, S], once per block per forward
        x = x + self.attn(self.norm1(x), bias, key_mask)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """UMT5 encoder: ids `[B, S]`, mask `[B, S]` -> hidden states `[B, S, D]`."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5Norm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = self.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        # Bucket indices depend only on S: built once here, each block looks up its own table.
        buckets = position_buckets(ids.shape[1], self.cfg.num_buckets, device)  # [S, S]
        x = self.token_embedding(ids)  # [B, S, D]
        for block in self.blocks:
            x = block(x, buckets, mask)
        return self.norm(x)

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> List[torch.Tensor]:
        """Per-prompt context: rows `[0, n_i)` of the output, `n_i = mask[i].sum()` (EOS included).

        Only the first `max(n_i)` positions are run. That is exact, not an approximation:
        a row never attends to masked keys, and the position bias depends only on `j - i`,
        so rows below `n_i` are the same as in a full `text_len` run (up to float summation
        order), for a fraction of the cost of 512 positions.
        """
        lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        n_max = max(max(lengths), 1)
        out = self.forward(ids[:, :n_max], mask[:, :n_max])  # [B, n_max, D]
        return [out[i, :n] for i, n in enumerate(lengths)]


def load_t5(path: Union[str, "os.PathLike[str]"], *, device: Union[str, torch.device] = "cpu",
            dtype: torch.dtype = torch.bfloat16) -> UMT5Encoder:
    """Load the encoder into a `UMT5Encoder` on `device` in `dtype`, from
    `models_t5_umt5-xxl-enc-bf16.pth`, a single `.safetensors` (e.g. `umt5_xxl_fp16.safetensors`)
    or a transformers `text_encoder/` directory (names mapped by `wanengine.io.formats`).

    The files are read memory-mapped (.pth, weights-only) or tensor by tensor (safetensors);
    the module is built on the meta device and each tensor is moved to its target once, so no
    full float32 copy of an 11 GB file is ever made. Raises CheckpointError naming the file
    (and tensor) on any mismatch.
    """
    model, tensors, source = open_t5(path)
    return assign_streaming(model, tensors.stream(), device=device, dtype=dtype, source=source)


def open_t5(path: Union[str, "os.PathLike[str]"]) -> Tuple[UMT5Encoder, "ComponentTensors", str]:
    """The checked first half of loading: (the encoder built on the meta device, its tensors
    not yet read -- `.stream()` them --, the file name for messages). Sharded loaders reuse it."""
    from ..io.formats.component_files import T5_KIND, open_component

    tensors = open_component(path, T5_KIND)
    source, shapes = tensors.source, tensors.shapes
    cfg = T5Config.from_state_dict_shapes(shapes, source)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    check_names_and_shapes(expected_shapes(model), shapes, source)
    return model, tensors, source


@torch.no_grad()
def encode_prompts(tokenizer: "Tokenizer", encoder: UMT5Encoder, prompts: Union[str, Sequence[str]],
                   device: Union[str, torch.device, None] = None) -> List[torch.Tensor]:
    """Tokenize and encode prompts; returns one `[n_i, D]` context per prompt on `device`
    (default: the encoder's device)."""
    ids, mask = tokenizer(prompts)
    contexts = encoder.encode(ids, mask)
    if device is not None:
        contexts = [c.to(device) for c in contexts]
    return contexts
