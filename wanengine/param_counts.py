"""Parameter counts of the Wan2.2 components from their configuration numbers alone (spec
`dit.md`, `t5.md`, `vae.md` tensor tables), for `wanengine plan`; tests check them against
modules built from the same numbers and against the golden checkpoint's tensors."""
from __future__ import annotations

from typing import List, Tuple

from .config import PATCH

def count_dit_params(dim: int, ffn_dim: int, freq_dim: int, num_layers: int, in_dim: int, out_dim: int,
                     text_dim: int = 4096, **_: object) -> Tuple[int, int]:
    """Parameters of one WanDiT expert from its dims (spec dit.md, Tensors) -> (total, per block)."""
    patch = PATCH[0] * PATCH[1] * PATCH[2]
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731  weight + bias
    attention = 4 * linear(dim, dim) + 2 * dim  # q, k, v, o + RMSNorm q, k (over all of D)
    block = (6 * dim                                    # modulation [1, 6, D]
             + 2 * attention                            # self- and cross-attention
             + 2 * dim                                  # norm3 (affine LayerNorm)
             + linear(dim, ffn_dim) + linear(ffn_dim, dim))
    embeddings = (dim * in_dim * patch + dim                          # patch Conv3d
                  + linear(text_dim, dim) + linear(dim, dim)          # text MLP
                  + linear(freq_dim, dim) + linear(dim, dim)          # time MLP
                  + linear(dim, 6 * dim))                             # time projection
    head = 2 * dim + linear(dim, out_dim * patch)
    return embeddings + num_layers * block + head, block


def count_dit_float32_params(dim: int, freq_dim: int, num_layers: int, **_: object) -> Tuple[int, int]:
    """Parameters the loader keeps in float32 whatever the run dtype (`dit_loading.FLOAT32_PARAMS`:
    the block and head `modulation` offsets, the time embedding and projection MLPs) -> (total,
    per block)."""
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731  weight + bias
    block = 6 * dim                                     # modulation [1, 6, D]
    time = linear(freq_dim, dim) + linear(dim, dim) + linear(dim, 6 * dim)
    return num_layers * block + 2 * dim + time, block   # + the head's modulation [1, 2, D]


def count_t5_params(vocab_size: int, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_layers: int,
                    num_buckets: int, **_: object) -> int:
    """UMT5 encoder parameters from its dims (spec t5.md; no biases, per-block position tables)."""
    block = 2 * dim + 4 * dim * dim_attn + 3 * dim * dim_ffn + num_buckets * num_heads
    return vocab_size * dim + num_layers * block + dim


class VaeTally:
    """Walks the VAE layout of spec vae.md, adding up parameters, FLOP and causal-cache bytes.
    Extents are totals over the clip: `frames` output frames of `h x w` pixels."""

    def __init__(self) -> None:
        self.params = 0
        self.flops = 0.0
        self.cache_bytes = 0.0  # float32 frames each temporal conv keeps from the previous chunk

    def conv(self, cin: int, cout: int, kernel: Tuple[int, int, int], frames: float, h: int, w: int,
             cached_frames: int = 0) -> None:
        volume = kernel[0] * kernel[1] * kernel[2]
        self.params += cin * cout * volume + cout
        self.flops += 2.0 * cin * cout * volume * frames * h * w
        self.cache_bytes += 4.0 * cached_frames * cin * h * w

    def res(self, cin: int, cout: int, frames: float, h: int, w: int) -> None:
        self.params += cin + cout  # two RMS_norm gammas
        self.conv(cin, cout, (3, 3, 3), frames, h, w, cached_frames=2)
        self.conv(cout, cout, (3, 3, 3), frames, h, w, cached_frames=2)
        if cin != cout:
            self.conv(cin, cout, (1, 1, 1), frames, h, w)

    def attention(self, c: int, frames: float, h: int, w: int) -> None:
        pixels = h * w  # single-head attention over one frame
        self.params += c + (3 * c * c + 3 * c) + (c * c + c)
        self.flops += frames * (2.0 * 4 * c * c * pixels + 4.0 * pixels * pixels * c)


def vae_encoder_tally(c: int, z: int, mult: List[int], res_blocks: int, temporal: List[bool],
                      frames: int, h: int, w: int) -> VaeTally:
    """Encoder over a `frames x h x w` video (chunks of 1, 4, 4, ... frames)."""
    tally, dims = VaeTally(), [c * m for m in [1] + list(mult)]
    tally.conv(3, dims[0], (3, 3, 3), frames, h, w, cached_frames=2)
    for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for i in range(res_blocks):
            tally.res(cin if i == 0 else cout, cout, frames, h, w)
        if stage < len(mult) - 1:
            h, w = h // 2, w // 2
            tally.conv(cout, cout, (1, 3, 3), frames, h, w)  # stride-2 Conv2d
            if temporal[stage]:  # stride-2 time conv on every chunk but the first
                tally.conv(cout, cout, (3, 1, 1), (frames - 1) / 2, h, w, cached_frames=1)
                frames = 1 + (frames - 1) // 2
    top = dims[-1]
    tally.res(top, top, frames, h, w), tally.attention(top, frames, h, w), tally.res(top, top, frames, h, w)
    tally.params += top
    tally.conv(top, 2 * z, (3, 3, 3), frames, h, w, cached_frames=2)
    tally.conv(2 * z, 2 * z, (1, 1, 1), frames, h, w)  # top-level conv1
    return tally


def vae_decoder_tally(c: int, z: int, mult: List[int], res_blocks: int, temporal: List[bool],
                      latent_frames: int, h: int, w: int) -> VaeTally:
    """Decoder from a `latent_frames x h x w` latent (one latent frame per chunk)."""
    tally, frames = VaeTally(), latent_frames
    dims = [c * m for m in [mult[-1]] + list(reversed(mult))]
    up_temporal = list(reversed(temporal))
    tally.conv(z, z, (1, 1, 1), frames, h, w)  # top-level conv2
    tally.conv(z, dims[0], (3, 3, 3), frames, h, w, cached_frames=2)
    tally.res(dims[0], dims[0], frames, h, w), tally.attention(dims[0], frames, h, w)
    tally.res(dims[0], dims[0], frames, h, w)
    for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if stage > 0 else cin  # every upsample halves the channels
        for i in range(res_blocks + 1):
            tally.res(cin if i == 0 else cout, cout, frames, h, w)
        if stage < len(mult) - 1:
            if up_temporal[stage]:  # time conv to 2C channels, interleaved into twice the frames
                tally.conv(cout, 2 * cout, (3, 1, 1), frames - 1, h, w, cached_frames=2)
                frames = 1 + 2 * (frames - 1)
            h, w = 2 * h, 2 * w
            tally.conv(cout, cout // 2, (1, 3, 3), frames, h, w)  # nearest 2x, then Conv2d
    tally.params += dims[-1]
    tally.conv(dims[-1], 3, (3, 3, 3), frames, h, w, cached_frames=2)
    return tally


def count_vae_params(dim: int, z_dim: int, dim_mult: List[int], num_res_blocks: int,
                     temporal_downsample: List[bool], **_: object) -> int:
    """Wan2.1 VAE parameters (encoder + decoder + the two top-level 1x1 convs)."""
    args = (dim, z_dim, list(dim_mult), num_res_blocks, list(temporal_downsample))
    return vae_encoder_tally(*args, 1, 8, 8).params + vae_decoder_tally(*args, 1, 1, 1).params
