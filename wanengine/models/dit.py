"""The Wan2.2 diffusion transformer (one MoE expert), spec `dit.md`.

Attribute names mirror the released tensor names, so the released state dict loads with
`strict=True` and no renaming. Parameter-free LayerNorms, RMSNorm, RoPE and attention go
through `wanengine.kernels` (never a backend directly).

Numerics (as the reference): the residual stream, the time embedding and all modulation /
gating math are float32; each linear layer runs in its parameter dtype (its input is cast
to the weight dtype); the output is float32.

Waste the reference has and this file avoids: the time embedding is computed once per
sample (`e [B, D]`, `e0 [B, 6, D]`) and broadcast over tokens, never materialised per token;
RoPE tables are built once per (grid, seq_len, device, dtype) and cached.

The forward is split into reusable pieces (`patchify`, `embed_time`, `embed_text`,
`rope_tables`, `blocks[i](...)`, `head`, `unpatchify`) so that parallelism can be applied
from outside to an unchanged model: a block accepts any contiguous slice of the padded
token sequence together with the matching rows of the RoPE tables, and its self-attention
core is the per-instance overridable method `self_attn.attend(q, k, v, k_lens)` (a
sequence-parallel wrapper replaces it with all-to-all + attention + all-to-all).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import kernels
from ..errors import CheckpointError, ConfigError
from .rope import rope_cos_sin

Grid = Tuple[int, int, int]
Context = Union[torch.Tensor, Sequence[torch.Tensor]]

_FIXED = {"patch_size": (1, 2, 2), "text_dim": 4096, "qk_norm": True, "cross_attn_norm": True}
_ROPE_CACHE_SIZE = 8


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DiTConfig:
    """Sizes of one expert (`config.json`); the fields after `eps` are fixed for this family."""

    dim: int
    ffn_dim: int
    freq_dim: int
    in_dim: int
    out_dim: int
    num_heads: int
    num_layers: int
    text_len: int = 512
    eps: float = 1e-6
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"DiT config: {name} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"DiT config: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"DiT config: head dim {self.head_dim} must be even and >= 6 for the 3-D RoPE")
        if self.freq_dim % 2:
            raise ConfigError(f"DiT config: freq_dim {self.freq_dim} must be even (cos and sin halves)")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < 1):
            raise ConfigError(f"DiT config: eps must be in (0, 1), got {self.eps!r}")
        if self.in_dim <= self.out_dim:
            raise ConfigError(f"DiT config: in_dim {self.in_dim} must exceed out_dim {self.out_dim} "
                              "(latent channels + conditioning channels)")
        for name, fixed in _FIXED.items():
            value = tuple(getattr(self, name)) if name == "patch_size" else getattr(self, name)
            if value != fixed:
                raise ConfigError(f"DiT config: {name} must be {fixed!r} for Wan2.2-I2V, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    @classmethod
    def from_json(cls, path: Union[str, "os.PathLike[str]"]) -> "DiTConfig":
        """Read an expert's `config.json` (released layout; a diffusers-style config is also
        understood). Keys starting with `_` are ignored; `model_type` must be `i2v`.
        Every problem is one CheckpointError naming the file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: file not found (an expert directory holds config.json and "
                                  "diffusion_pytorch_model*.safetensors)")
        try:
            with open(path, "r", encoding="utf-8") as handle:
                raw = json.load(handle)
        except (OSError, ValueError) as exc:  # ValueError: bad JSON, a 5000-digit number, bad UTF-8
            raise CheckpointError(f"{path}: not a readable JSON config: {str(exc)[:200]}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        try:
            return cls(**_config_values(raw, path))
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc


def _config_values(raw: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Map a parsed config.json to DiTConfig keyword arguments (raises CheckpointError)."""
    keys = {k: v for k, v in raw.items() if not k.startswith("_")}
    if "num_attention_heads" in keys:  # diffusers' WanTransformer3DModel naming
        keys = _from_diffusers_config(keys, path)
    model_type = keys.get("model_type")
    if model_type != "i2v":
        raise CheckpointError(f"{path}: model_type is {model_type!r}; this engine runs only 'i2v' experts")
    known = {f.name for f in fields(DiTConfig)}
    required = [f.name for f in fields(DiTConfig) if f.name not in ("text_len", "eps") and f.name not in _FIXED]
    missing = [name for name in required if name not in keys]
    if missing:
        raise CheckpointError(f"{path}: missing config key(s) {', '.join(missing)}")
    values = {k: v for k, v in keys.items() if k in known}
    if "patch_size" in values and isinstance(values["patch_size"], list):
        values["patch_size"] = tuple(values["patch_size"])
    window = keys.get("window_size", (-1, -1))
    if not isinstance(window, (list, tuple)) or tuple(window) != (-1, -1):
        raise CheckpointError(f"{path}: window_size {window!r} is not supported (global attention is (-1, -1))")
    return values


def _from_diffusers_config(keys: Dict[str, Any], path: str) -> Dict[str, Any]:
    try:
        heads, head_dim = int(keys["num_attention_heads"]), int(keys["attention_head_dim"])
        out = {"dim": heads * head_dim, "num_heads": heads, "ffn_dim": keys["ffn_dim"],
               "freq_dim": keys["freq_dim"], "in_dim": keys["in_channels"], "out_dim": keys["out_channels"],
               "num_layers": keys["num_layers"], "eps": keys.get("eps", 1e-6)}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete diffusers config ({exc})") from exc
    for name in ("patch_size", "text_dim", "cross_attn_norm"):
        if name in keys:
            out[name] = keys[name]
    if "qk_norm" in keys:  # diffusers stores the norm kind; Wan's is RMSNorm over all heads
        out["qk_norm"] = keys["qk_norm"] in (True, "rms_norm_across_heads")
    # diffusers has no model_type; an image-conditioned Wan expert is the one with 36 input channels.
    out["model_type"] = keys.get("model_type", "i2v" if out["in_dim"] == 36 else "t2v")
    return out


# --------------------------------------------------------------------------- small modules
class RMSNorm(nn.Module):
    """RMSNorm over the whole last dim with a weight (q/k norms); math in `kernels.rms_norm`."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class AffineLayerNorm(nn.Module):
    """LayerNorm with weight and bias (`norm3`, the cross-attention pre-norm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


def _init_modulation(param: nn.Parameter) -> None:
    """Random offsets of std 1/sqrt(D) (checkpoints overwrite them). uniform_ on purpose: on the
    meta device randn/normal_ pull in torch's Python meta registrations (~1 s of imports)."""
    bound = (3.0 / param.shape[-1]) ** 0.5
    nn.init.uniform_(param, -bound, bound)


def _linear_in(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """`x` cast to the dtype of the first parameter of `layer` (linears run in parameter dtype)."""
    return x.to(next(layer.parameters()).dtype)


@dataclass
class TextEmbedding:
    """Embedded text `[B, text_len, D]` kept as its distinct rows.

    The prompts are zero-padded to text_len before the text MLP, so every padded row embeds to
    the same vector. `rows [B, n, D]` (n = the longest prompt) are the prompt rows (shorter
    prompts padded to n), `pad [1, 1, D]` is the embedded zero row that all rows from n on
    equal, or None when n == text_len. Row-wise maps (`map`) run on the n + 1 distinct rows
    only; the result is the same as on all text_len rows (cross-attention still sees them all).
    """

    rows: torch.Tensor
    pad: Optional[torch.Tensor]
    length: int

    @property
    def batch(self) -> int:
        return self.rows.shape[0]

    def map(self, fn) -> torch.Tensor:
        """`fn` (row-wise) applied to the distinct rows -> `[B, text_len, ...]`."""
        head = fn(self.rows)
        if self.pad is None:
            return head
        tail = fn(self.pad).expand(head.shape[0], self.length - head.shape[1], *head.shape[2:])
        return torch.cat((head, tail), dim=1)

    def full(self) -> torch.Tensor:
        """`[B, text_len, D]`."""
        return self.map(lambda rows: rows)


class SelfAttention(nn.Module):
    """q/k/v/o projections, RMSNorm over the full D on q and k, 3-D RoPE, masked attention."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_lens: Optional[torch.Tensor]) -> torch.Tensor:
        """`x [B, S, D]` (parameter dtype; S may be a chunk of the sequence) -> `[B, S, D]`."""
        bsz, seqlen, _ = x.shape
        heads = (bsz, seqlen, self.num_heads, self.head_dim)
        q = kernels.rotary(self.norm_q(self.q(x)).view(heads), cos, sin)  # [B, S, N, d]
        k = kernels.rotary(self.norm_k(self.k(x)).view(heads), cos, sin)
        v = self.v(x).view(heads)
        return self.o(self.attend(q, k, v, k_lens).flatten(2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_lens: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention core on `[B, S, N, d]`; keys at index >= k_lens[b] are masked. Overridable
        per instance (e.g. `attn.attend = ulysses_attend`) by sequence-parallel wrappers."""
        return kernels.attention(q, k, v, scale=self.head_dim ** -0.5, k_lens=k_lens)


class CrossAttention(nn.Module):
    """Attention from tokens to the 512 embedded text rows (no RoPE, no mask)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, context: Union[torch.Tensor, TextEmbedding]) -> torch.Tensor:
        """`x [B, S, D]`, `context [B, T, D]` or a `TextEmbedding` (parameter dtype) -> `[B, S, D]`."""
        bsz, seqlen, _ = x.shape
        q = self.norm_q(self.q(x)).view(bsz, seqlen, self.num_heads, self.head_dim)
        if isinstance(context, TextEmbedding):  # project the distinct rows only
            k = context.map(lambda rows: self.norm_k(self.k(rows)))
            v = context.map(self.v)
        else:
            k, v = self.norm_k(self.k(context)), self.v(context)
        k = k.view(bsz, -1, self.num_heads, self.head_dim)
        v = v.view(bsz, -1, self.num_heads, self.head_dim)
        return self.o(kernels.attention(q, k, v, scale=self.head_dim ** -0.5).flatten(2))


class DiTBlock(nn.Module):
    """One transformer block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, self.eps = config.dim, config.eps
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        _init_modulation(self.modulation)
        self.self_attn = SelfAttention(dim, config.num_heads, config.eps)
        self.norm3 = AffineLayerNorm(dim, config.eps)
        self.cross_attn = CrossAttention(dim, config.num_heads, config.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: Union[torch.Tensor, TextEmbedding],
                cos: torch.Tensor, sin: torch.Tensor, k_lens: Optional[torch.Tensor]) -> torch.Tensor:
        """x `[B, S, D]` float32 residual stream (S: the whole padded sequence or a chunk of it),
        e0 `[B, 6, D]` float32 time modulation (per sample, broadcast over tokens),
        context `[B, T, D]` embedded text (or a `TextEmbedding`), cos/sin `[1, S, 1, d]` rows of
        x's tokens, k_lens `[B]` real-token count of the full sequence -> `[B, S, D]` float32."""
        mod = (self.modulation.float() + e0.float()).unsqueeze(2)  # [B, 6, 1, D]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod.unbind(1)  # each [B, 1, D]

        a = kernels.layer_norm_modulate(x, scale_msa, shift_msa, self.eps)  # float32
        attn = self.self_attn(_linear_in(a, self.self_attn.q), cos, sin, k_lens)
        x = torch.addcmul(x, attn.float(), gate_msa)  # x + attn * gate, in float32

        cross = self.cross_attn(_linear_in(self.norm3(x), self.cross_attn.q), context)
        x = x + cross.float()  # no gate on the cross-attention branch

        b = kernels.layer_norm_modulate(x, scale_ffn, shift_ffn, self.eps)
        return torch.addcmul(x, self.ffn(_linear_in(b, self.ffn)).float(), gate_ffn)


class DiTHead(nn.Module):
    """Final modulated LayerNorm + linear to `out_dim * prod(patch)` values per token."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, self.eps = config.dim, config.eps
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))
        _init_modulation(self.modulation)
        self.head = nn.Linear(dim, config.out_dim * config.patch_volume)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x `[B, S, D]` float32, e `[B, D]` float32 (note: e, not e0) -> `[B, S, out*4]` float32."""
        shift, scale = (self.modulation.float() + e.float().unsqueeze(1)).unsqueeze(2).unbind(1)  # [B, 1, D]
        z = kernels.layer_norm_modulate(x, scale, shift, self.eps)
        return self.head(_linear_in(z, self.head)).float()


def host_to_device(tensor: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """Copy a small host tensor to `device` without stalling the host: from page-locked memory
    with `non_blocking` on accelerators (a pageable copy makes the host wait for the device,
    once per forward -- seen with CUDA's sync-debug mode on an H200)."""
    device = torch.device(device)
    if device.type in ("cuda", "npu") and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`[B]` timesteps -> `[B, dim]` float32 `concat(cos(t f), sin(t f))`, f_j = 10000^(-j/half).
    Computed in float64 on the CPU (some accelerators lack float64), then cast to float32."""
    half = dim // 2
    pos = t.detach().to("cpu", torch.float64).reshape(-1)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    angles = pos[:, None] * freqs[None, :]  # [B, half]
    return torch.cat((torch.cos(angles), torch.sin(angles)), dim=1).to(torch.float32)


# --------------------------------------------------------------------------- the model
class WanDiT(nn.Module):
    """One Wan2.2-I2V expert. `forward(x, t, context, y, seq_len)`; see the module docstring."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.head = DiTHead(config)
        # (grid, seq_len, start, end, device, dtype) -> (cos, sin); small LRU, not a buffer.
        self._rope_cache: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    # ---- pieces (public so that wrappers can recombine them) ----
    def patchify(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        """x `[B, C_x, F, H, W]`, y `[B, C_y, F, H, W]` -> tokens `[B, L, D]` float32, grid (f, h, w)."""
        if x.dim() != 5 or y.dim() != 5 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise ValueError(f"x and y must be [B, C, F, H, W] with equal B, F, H, W; got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        if x.shape[1] + y.shape[1] != self.config.in_dim:
            raise ValueError(f"x and y channels must sum to in_dim {self.config.in_dim}; "
                             f"got {x.shape[1]} + {y.shape[1]}")
        pf, ph, pw = self.config.patch_size
        if x.shape[2] % pf or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by the patch {self.config.patch_size}")
        u = _linear_in(torch.cat((x, y), dim=1), self.patch_embedding)  # [B, C, F, H, W]
        bsz, chans, frames, height, width = u.shape
        grid = (frames // pf, height // ph, width // pw)
        # kernel == stride, so the Conv3d is a matmul over non-overlapping patches. Written as one,
        # it runs on the matmul path (no TF32 by default on CUDA, unlike cuDNN convolutions, so a
        # float32 run keeps float32 accuracy) and yields row-major [B, L, D] tokens directly.
        patches = u.reshape(bsz, chans, grid[0], pf, grid[1], ph, grid[2], pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(bsz, -1, chans * pf * ph * pw)  # [B, L, C*pf*ph*pw]
        weight = self.patch_embedding.weight.flatten(1)  # [D, C*pf*ph*pw], same (c, pf, ph, pw) order
        tokens = torch.nn.functional.linear(patches, weight, self.patch_embedding.bias)
        tokens = tokens.to(torch.float32, memory_format=torch.contiguous_format)  # [B, L, D]
        return tokens, grid  # [B, L, D], (f, h, w) row-major tokens

    def embed_time(self, t: Union[torch.Tensor, float, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Timesteps `[B]` (or a scalar) -> `e [B, D]`, `e0 [B, 6, D]`, both float32, once per sample."""
        device = self.patch_embedding.weight.device
        t = torch.as_tensor(t).reshape(-1)
        emb = host_to_device(sinusoidal_embedding(t, self.config.freq_dim), device)  # [B, freq_dim]
        e = self.time_embedding(_linear_in(emb, self.time_embedding)).float()  # [B, D]
        e0 = self.time_projection(_linear_in(e, self.time_projection)).float()  # [B, 6D]
        return e, e0.unflatten(1, (6, self.config.dim))

    def embed_text(self, context: Context) -> torch.Tensor:
        """Text rows (a list of `[n_i, 4096]`, a `[B, n, 4096]` or a single `[n, 4096]` tensor),
        each zero-padded to text_len, -> `[B, text_len, D]` in parameter dtype. The padded rows
        are not zero after the MLP and cross-attention sees all of them (as the reference)."""
        stacked = self._stack_text(context, self.config.text_len)  # [B, text_len, 4096]
        return self.text_embedding(_linear_in(stacked, self.text_embedding))

    def embed_text_rows(self, context: Context) -> TextEmbedding:
        """`embed_text` as a `TextEmbedding`: the MLP runs on the prompt rows and one zero row
        instead of all text_len rows (the padded rows all embed to that one row)."""
        rows = self._stack_text(context, None)  # [B, n, 4096], n = the longest prompt
        bsz, longest, text_dim = rows.shape
        if longest == self.config.text_len:
            return TextEmbedding(self.text_embedding(_linear_in(rows, self.text_embedding)), None, longest)
        flat = torch.cat((rows.reshape(bsz * longest, text_dim), rows.new_zeros(1, text_dim)))
        embedded = self.text_embedding(_linear_in(flat, self.text_embedding))  # [B * n + 1, D]
        return TextEmbedding(embedded[:-1].view(bsz, longest, -1), embedded[-1:].view(1, 1, -1), self.config.text_len)

    def _stack_text(self, context: Context, length: Optional[int]) -> torch.Tensor:
        """Validated rows zero-padded to `length` (None: the longest) -> `[B, length, 4096]`."""
        rows = [context] if isinstance(context, torch.Tensor) and context.dim() == 2 else list(context)
        text_len, text_dim = self.config.text_len, self.config.text_dim
        for i, r in enumerate(rows):
            if r.dim() != 2 or r.shape[1] != text_dim or r.shape[0] > text_len:
                raise ValueError(f"context[{i}] must be [n <= {text_len}, {text_dim}], got {tuple(r.shape)}")
        length = max([r.shape[0] for r in rows] + [1]) if length is None else length
        padded = [torch.cat((r, r.new_zeros(length - r.shape[0], text_dim))) if r.shape[0] < length else r
                  for r in rows]
        return torch.stack(padded).to(self.patch_embedding.weight.device)

    def rope_tables(self, grid: Sequence[int], seq_len: int, device: Union[str, torch.device], *,
                    dtype: torch.dtype = torch.float32, start: int = 0, end: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` `[1, end - start, 1, head_dim]` on `device` for global tokens [start, end)
        (default: all seq_len). Cached per (grid, seq_len, range, device, dtype); read-only."""
        end = seq_len if end is None else end
        key = (tuple(int(g) for g in grid), int(seq_len), int(start), int(end), torch.device(device), dtype)
        tables = self._rope_cache.get(key)
        if tables is None:
            cos, sin = rope_cos_sin(grid, seq_len, self.config.head_dim, start=start, end=end)
            tables = (host_to_device(cos.to(dtype), device), host_to_device(sin.to(dtype), device))
            self._rope_cache[key] = tables
            while len(self._rope_cache) > _ROPE_CACHE_SIZE:
                self._rope_cache.popitem(last=False)
        self._rope_cache.move_to_end(key)
        return tables

    def unpatchify(self, out: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """`[B, S >= L, out * prod(patch)]` -> `[B, out, F, H, W]` (drops the padding rows)."""
        f, h, w = grid
        pf, ph, pw = self.config.patch_size
        c = self.config.out_dim
        u = out[:, : f * h * w].reshape(out.shape[0], f, h, w, pf, ph, pw, c)
        u = u.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, f, pf, h, ph, w, pw]
        return u.reshape(out.shape[0], c, f * pf, h * ph, w * pw)

    # ---- the whole forward, in three reusable stages ----
    def embed_inputs(self, x: torch.Tensor, t: Union[torch.Tensor, float, int], context: Context, y: torch.Tensor,
                     seq_len: Optional[int] = None, *, seq_multiple: int = 1) -> "DiTInputs":
        """Everything before the blocks: patchified tokens (unpadded), per-sample time and text
        embeddings, and `seq_len` (default L) rounded up to a multiple of `seq_multiple`."""
        unbatched = x.dim() == 4
        if unbatched:
            x, y = x[None], y[None]
        bsz = x.shape[0]
        tokens, grid = self.patchify(x, y)  # [B, L, D] float32
        num_tokens = tokens.shape[1]
        seq_len = num_tokens if seq_len is None else int(seq_len)
        if seq_len < num_tokens:
            raise ValueError(f"seq_len {seq_len} is smaller than the {num_tokens} tokens of the latent")
        seq_len = -(-seq_len // seq_multiple) * seq_multiple
        t = torch.as_tensor(t).reshape(-1)
        if t.numel() == 1 and bsz > 1:
            t = t.expand(bsz)
        e, e0 = self.embed_time(t)  # [B, D], [B, 6, D]
        text = self.embed_text_rows(context)  # [B, text_len, D] as its distinct rows
        if t.numel() != bsz or text.batch != bsz:
            raise ValueError(f"batch of {bsz} latents needs {bsz} timesteps and contexts; "
                             f"got {t.numel()} and {text.batch}")
        # Host-side key lengths: backends read them without a device->host sync.
        k_lens = torch.full((bsz,), num_tokens, dtype=torch.int32)
        return DiTInputs(tokens, grid, seq_len, e, e0, text, k_lens, unbatched)

    def run_blocks(self, tokens: torch.Tensor, inputs: "DiTInputs", cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The block stack and the head on `tokens [B, S, D]` (all of the padded sequence or one
        rank's chunk, with the matching RoPE rows) -> `[B, S, out * prod(patch)]` float32."""
        for block in self.blocks:
            tokens = block(tokens, inputs.e0, inputs.text, cos, sin, inputs.k_lens)
        return self.head(tokens, inputs.e)

    def finish(self, out: torch.Tensor, inputs: "DiTInputs") -> torch.Tensor:
        """Head output of the whole padded sequence -> `[B, 16, F, H, W]` (or unbatched)."""
        video = self.unpatchify(out, inputs.grid)
        return video[0] if inputs.unbatched else video

    def forward(self, x: torch.Tensor, t: Union[torch.Tensor, float, int], context: Context, y: torch.Tensor,
                seq_len: Optional[int] = None) -> torch.Tensor:
        """Flow prediction for latents `x [B, 16, F, H, W]` with conditioning `y [B, 20, F, H, W]`,
        timesteps `t [B]` (or a scalar), text rows `context` (list of `[n_i, 4096]` or a padded
        `[B, 512, 4096]` tensor) and `seq_len >= L` padded tokens (default L) -> `[B, 16, F, H, W]`
        float32. Unbatched `x [16, F, H, W]` / `y` with a single `[n, 4096]` context also work."""
        inputs = self.embed_inputs(x, t, context, y, seq_len)
        tokens = inputs.padded_tokens(0, inputs.seq_len)
        cos, sin = self.rope_tables(inputs.grid, inputs.seq_len, tokens.device)
        return self.finish(self.run_blocks(tokens, inputs, cos, sin), inputs)


@dataclass
class DiTInputs:
    """The per-call state shared by all blocks (see `WanDiT.embed_inputs`)."""

    tokens: torch.Tensor  # [B, L, D] float32, unpadded
    grid: Tuple[int, int, int]
    seq_len: int
    e: torch.Tensor  # [B, D] float32
    e0: torch.Tensor  # [B, 6, D] float32
    text: TextEmbedding  # [B, text_len, D], as its distinct rows
    k_lens: torch.Tensor  # [B] real tokens, on the host
    unbatched: bool

    def padded_tokens(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the sequence zero-padded to seq_len, without building all of it."""
        local = self.tokens[:, start:min(end, self.tokens.shape[1])]
        missing = (end - start) - local.shape[1]
        if missing > 0:
            local = torch.cat((local, local.new_zeros(local.shape[0], missing, local.shape[2])), dim=1)
        return local
