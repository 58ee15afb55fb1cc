"""Wan2.1 VAE: golden parity (encode/decode), re-entrancy, bf16 bounds, exact row-tiled
decode, input validation and loader errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import rel_err
from wanengine.errors import CheckpointError, UserInputError
from wanengine.models.vae import VAEConfig, WanVAE, infer_vae_config, load_vae
from wanengine.models.vae_blocks import CausalCache, CausalConv3d, Resample

# bf16 weights + activations against the float32 reference, measured on the golden case:
# encode 7.3e-3 (CPU) / 8.7e-3 (H200), decode 3.7e-2 / 4.0e-2 relative (decoded max|ref| = 1,
# mean abs error ~5e-3).
BF16_ENCODE_BOUND = 2e-2
BF16_DECODE_BOUND = 8e-2


@pytest.fixture(scope="module")
def vae_golden(golden: Path) -> dict:
    return load_file(str(golden / "vae.safetensors"))


@pytest.fixture(scope="module")
def vae_path(golden_ckpt: Path) -> Path:
    return golden_ckpt / "Wan2.1_VAE.pth"


@pytest.fixture(scope="module")
def vae(vae_path: Path) -> WanVAE:
    return load_vae(vae_path)


def test_config_inferred_from_shapes(vae: WanVAE) -> None:
    assert vae.config == VAEConfig(dim=16, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                                   temporal_downsample=(False, True, True))
    assert vae.dtype == torch.float32


def test_encode_matches_golden(vae: WanVAE, vae_golden: dict) -> None:
    mu = vae.encode(vae_golden["video"])
    assert mu.shape == vae_golden["mu"].shape == (16, 2, 4, 6)
    assert rel_err(mu, vae_golden["mu"]) <= 1e-4  # measured ~7e-8


def test_decode_matches_golden(vae: WanVAE, vae_golden: dict) -> None:
    video = vae.decode(vae_golden["z"])
    assert video.shape == vae_golden["decoded"].shape == (3, 5, 32, 48)
    assert rel_err(video, vae_golden["decoded"]) <= 1e-4  # measured ~2.4e-6
    assert video.abs().max() <= 1.0


def test_calls_are_reentrant_and_batched(vae: WanVAE, vae_golden: dict) -> None:
    video, z = vae_golden["video"], vae_golden["z"]
    first_mu, first_video = vae.encode(video), vae.decode(z)
    second_mu, second_video = vae.encode(video), vae.decode(z)
    assert torch.equal(first_mu, second_mu) and torch.equal(first_video, second_video)
    batched = vae.decode(torch.stack([z, z]))
    assert batched.shape == (2, 3, 5, 32, 48)
    assert torch.allclose(batched[1], first_video, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_bf16_within_stated_bounds(vae_path: Path, vae_golden: dict) -> None:
    vae_bf16 = load_vae(vae_path, dtype=torch.bfloat16)
    assert vae_bf16.dtype == torch.bfloat16
    assert vae_bf16.encoder.head[0].gamma.dtype == torch.float32  # norm scales stay float32
    mu = vae_bf16.encode(vae_golden["video"])
    video = vae_bf16.decode(vae_golden["z"])
    assert mu.dtype == video.dtype == torch.float32
    assert rel_err(mu, vae_golden["mu"]) <= BF16_ENCODE_BOUND
    assert rel_err(video, vae_golden["decoded"]) <= BF16_DECODE_BOUND


@pytest.mark.slow
def test_row_tiled_decode_equals_untiled(vae: WanVAE) -> None:
    latent = torch.randn(16, 2, 8, 12, generator=torch.Generator().manual_seed(0))
    untiled = vae.decode(latent)
    assert untiled.shape == (3, 5, 64, 96)
    for tile_rows, offload in ((4, False), (3, True)):  # 2 bands of 4 rows; 3 bands of 3, 3, 2 rows
        tiled = vae.decode(latent, tile_rows=tile_rows, offload_caches=offload)
        assert rel_err(tiled, untiled) <= 1e-5, tile_rows  # measured 0 (bit-identical here)


def test_band_rows_halo_arithmetic(vae: WanVAE) -> None:
    ranges = vae.decoder.band_rows((128, 192), latent_height=64)
    assert ranges[-1] == (128, 192)
    # full res: head 1 + 3 blocks x 2 + upsample conv 1 = 8 rows -> 4 at 1/2; 1/2: 4 + 6 + 1 = 11
    # -> 6 at 1/4; 1/4: 6 + 6 + 1 = 13 -> 7 at 1/8; 1/8: 7 + 6 = 13 latent rows per side
    assert ranges[0] == (16 - 13, 24 + 13)
    assert ranges[-2] == (128 - 1, 192 + 1)  # the head conv needs one row each side
    top = vae.decoder.band_rows((0, 64), latent_height=64)
    assert all(lo == 0 for lo, _ in top)  # never widened past the image border


def test_upsample3d_time_rules() -> None:
    torch.manual_seed(0)
    layer = Resample(4, "upsample3d").eval()
    cache = CausalCache()
    frames = [torch.randn(1, 4, 1, 2, 2) for _ in range(3)]
    out = [layer(f, cache) for f in frames]
    assert [o.shape[2] for o in out] == [1, 2, 2]  # the first latent frame is not doubled
    assert torch.equal(out[0][:, :, 0], layer.resample(frames[0][:, :, 0]))  # ...nor time-convolved
    # chunk 1 sees [0, 0, x1]; chunk 2 sees [0, x1, x2]: a stored zero frame, never x0
    w, b, zero = layer.time_conv.weight, layer.time_conv.bias, torch.zeros_like(frames[0])
    t1 = F.conv3d(torch.cat([zero, zero, frames[1]], 2), w, b)[:, :, 0]  # [1, 8, 2, 2]
    t2 = F.conv3d(torch.cat([zero, frames[1], frames[2]], 2), w, b)[:, :, 0]
    # channels 0..3 -> frame 2t, channels 4..7 -> frame 2t+1
    assert torch.allclose(out[1][:, :, 0], layer.resample(t1[:, :4]), atol=1e-6)
    assert torch.allclose(out[1][:, :, 1], layer.resample(t1[:, 4:]), atol=1e-6)
    assert torch.allclose(out[2][:, :, 0], layer.resample(t2[:, :4]), atol=1e-6)
    assert torch.allclose(out[2][:, :, 1], layer.resample(t2[:, 4:]), atol=1e-6)


def test_downsample3d_time_rules() -> None:
    torch.manual_seed(0)
    layer = Resample(4, "downsample3d").eval()
    cache = CausalCache()
    first, second = torch.randn(1, 4, 1, 4, 4), torch.randn(1, 4, 4, 4, 4)

    def spatial(x: torch.Tensor) -> torch.Tensor:  # per-frame pad + stride-2 conv, back to 5-D
        return layer.resample(x.permute(0, 2, 1, 3, 4).flatten(0, 1)).unsqueeze(0).transpose(1, 2)

    assert torch.equal(layer(first, cache), spatial(first))  # first chunk: no time conv
    expected = F.conv3d(torch.cat([spatial(first), spatial(second)], 2), layer.time_conv.weight,
                        layer.time_conv.bias, stride=(2, 1, 1))  # [stored[-1], chunk]: 5 -> 2 frames
    assert expected.shape[2] == 2
    assert torch.allclose(layer(second, cache), expected, atol=1e-6)


def test_causal_conv_chunks_equal_whole_clip() -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(3, 5, 3, padding=1).eval()
    clip = torch.randn(1, 3, 9, 4, 5)
    whole = conv(clip)
    cache = CausalCache()
    chunked = torch.cat([conv(clip[:, :, a:b], cache) for a, b in ((0, 1), (1, 2), (2, 5), (5, 9))], 2)
    assert torch.allclose(chunked, whole, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 32, 48), (3, 5, 30, 48), (3, 5, 32, 44), (4, 5, 32, 48), (5, 32, 48)])
def test_encode_rejects_bad_video(vae: WanVAE, shape: tuple) -> None:
    with pytest.raises(UserInputError, match="video"):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_bad_latent(vae: WanVAE) -> None:
    with pytest.raises(UserInputError, match="latent"):
        vae.decode(torch.zeros(8, 2, 4, 6))
    with pytest.raises(UserInputError, match="latent"):
        vae.decode(torch.zeros(16, 4, 6))
    with pytest.raises(UserInputError, match="tile_rows"):
        vae.decode(torch.zeros(16, 1, 4, 6), tile_rows=0)
    with pytest.raises(UserInputError, match="offload_caches needs tile_rows"):
        vae.decode(torch.zeros(16, 1, 4, 6), offload_caches=True)


def test_other_width_is_inferred(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = VAEConfig(dim=8)
    path = tmp_path / "vae8.pth"
    torch.save(WanVAE(config).state_dict(), path)
    loaded = load_vae(path)
    assert loaded.config == config
    assert loaded.decode(torch.randn(16, 2, 2, 2)).shape == (3, 5, 16, 16)


# -- loader errors: each names the file ------------------------------------------------------

@pytest.fixture(scope="module")
def state(vae_path: Path) -> dict:
    return torch.load(vae_path, map_location="cpu", weights_only=True)


def _save(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(state, path)
    return path


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match=f"{path}.*not found"):
        load_vae(path)


def test_truncated_file(tmp_path: Path, vae_path: Path) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    data = vae_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_vae(path)


def test_missing_tensor(tmp_path: Path, state: dict) -> None:
    broken = {k: v for k, v in state.items() if k != "decoder.head.2.bias"}
    path = _save(tmp_path, broken)
    with pytest.raises(CheckpointError, match=f"{path}.*missing.*decoder.head.2.bias"):
        load_vae(path)


def test_missing_config_tensor(tmp_path: Path, state: dict) -> None:
    path = _save(tmp_path, {k: v for k, v in state.items() if k != "conv2.weight"})
    with pytest.raises(CheckpointError, match=f"{path}.*conv2.weight"):
        load_vae(path)


def test_unexpected_tensor(tmp_path: Path, state: dict) -> None:
    path = _save(tmp_path, {**state, "decoder.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=f"{path}.*unexpected.*decoder.extra.weight"):
        load_vae(path)


def test_misshaped_tensor(tmp_path: Path, state: dict) -> None:
    path = _save(tmp_path, {**state, "decoder.middle.1.proj.weight": torch.zeros(64, 64, 1, 2)})
    with pytest.raises(CheckpointError, match=f"{path}.*decoder.middle.1.proj.weight.*shape"):
        load_vae(path)


def test_infer_rejects_foreign_layout() -> None:
    with pytest.raises(CheckpointError, match="ckpt.pth"):
        infer_vae_config({"encoder.conv1.weight": (16, 3, 3, 3, 3), "conv2.weight": (16, 16, 1, 1, 1)}, "ckpt.pth")
