"""The CPU fast paths give the plain computation's result: the VAE's channels-last oneDNN convs
(with the first chunk's zero time taps dropped and the sub-pixel upsampling conv) and the DiT's
text embedding on distinct rows. Random small weights; bounds are float32 summation-order
differences (observed values in brackets)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from wanengine.models import vae_blocks
from wanengine.models.dit import DiTConfig, TextEmbedding, WanDiT
from wanengine.models.vae import VAEConfig, WanVAE
from wanengine.models.vae_blocks import CausalConv3d, Resample, conv3d, upsample2x_conv3x3

pytestmark = pytest.mark.skipif(not vae_blocks.CPU_FAST_PATH, reason="this torch build has no oneDNN")


@pytest.fixture
def fast_path(monkeypatch):
    """Run a block of code with the fast path on, then off: `fast_path(fn)` -> (fast, plain)."""
    def both(fn):
        monkeypatch.setattr(vae_blocks, "CPU_FAST_PATH", True)
        fast = fn()
        monkeypatch.setattr(vae_blocks, "CPU_FAST_PATH", False)
        return fast, fn()
    return both


@pytest.mark.parametrize("shape, out_channels, stride", [
    ((1, 3, 6, 20, 18), 8, (1, 1, 1)),  # the encoder's 3-channel conv1 (torch would pick unfold + GEMM)
    ((1, 16, 3, 6, 7), 16, (1, 1, 1)),
    ((2, 8, 5, 9, 9), 4, (2, 1, 1)),  # a temporal downsampling conv
])
def test_onednn_conv3d_matches_torch(shape, out_channels, stride):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(*shape), torch.randn(out_channels, shape[1], 3, 3, 3), torch.randn(out_channels)
    with torch.no_grad():
        out = conv3d(x, weight, bias, stride)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel_err(out, F.conv3d(x, weight, bias, stride)) <= 1e-5  # [~5e-7]


def test_first_chunk_drops_the_zero_time_taps(fast_path):
    torch.manual_seed(0)
    conv = CausalConv3d(6, 5, 3, padding=1)
    x = torch.randn(1, 6, 1, 7, 9)  # one frame, nothing cached: two causal zero frames
    expected = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias)
    with torch.no_grad():
        fast, plain = fast_path(lambda: conv.conv_with_past(x, None))
        one_past = fast_path(lambda: conv.conv_with_past(x, x * 2))  # one zero frame left
    assert fast.shape == plain.shape == expected.shape == (1, 5, 1, 7, 9)
    assert rel_err(fast, expected) <= 1e-5 and rel_err(plain, expected) <= 1e-5
    expected_past = F.conv3d(F.pad(torch.cat([x * 2, x], 2), (1, 1, 1, 1, 1, 0)), conv.weight, conv.bias)
    assert all(rel_err(out, expected_past) <= 1e-5 for out in one_past)


@pytest.mark.parametrize("n, c, h, w, c_out", [(2, 8, 5, 7, 4), (1, 16, 3, 3, 8), (4, 3, 1, 6, 2)])
def test_subpixel_upsampling_conv(n, c, h, w, c_out):
    torch.manual_seed(0)
    x, conv = torch.randn(n, c, h, w), torch.nn.Conv2d(c, c_out, 3, padding=1)
    with torch.no_grad():
        expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
        out = upsample2x_conv3x3(x, conv.weight, conv.bias)
    assert out.shape == expected.shape
    assert rel_err(out, expected) <= 1e-5  # [~4e-7]


def test_a_wrapper_that_replaces_the_upsampling_conv_is_still_called(monkeypatch):
    monkeypatch.setattr(vae_blocks, "CPU_FAST_PATH", True)
    resample = Resample(8, "upsample2d")
    calls = []
    plain_forward = resample.resample[1].forward
    resample.resample[1].forward = lambda x: calls.append(x.shape) or plain_forward(x)
    with torch.no_grad():
        out = resample(torch.randn(1, 8, 2, 4, 5), vae_blocks.CausalCache())
    assert calls and out.shape == (1, 4, 2, 8, 10)


def test_vae_fast_path_matches_the_plain_path(fast_path):
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8)).eval()
    video = torch.rand(3, 9, 32, 40) * 2 - 1
    latent = torch.randn(16, 3, 4, 5)
    with torch.no_grad():
        mu_fast, mu_plain = fast_path(lambda: vae.encode(video))
        out_fast, out_plain = fast_path(lambda: vae.decode(latent))
        band_fast, _ = fast_path(lambda: vae.decode(latent, tile_rows=2))
    assert mu_fast.is_contiguous() and out_fast.is_contiguous()
    assert rel_err(mu_fast, mu_plain) <= 1e-5  # [~4e-7]
    assert rel_err(out_fast, out_plain) <= 1e-5  # [~1e-6]
    assert rel_err(band_fast, out_plain) <= 1e-5  # exact bands on the fast path too


# --------------------------------------------------------------------------- DiT text rows
def _dit():
    torch.manual_seed(0)
    return WanDiT(DiTConfig(dim=64, ffn_dim=128, freq_dim=256, in_dim=36, out_dim=16, num_heads=2,
                            num_layers=2, text_len=32)).eval()


def test_text_embedding_runs_the_mlp_on_distinct_rows_only():
    model = _dit()
    rows = []
    hook = model.text_embedding[0].register_forward_hook(lambda m, i, o: rows.append(i[0].numel() // i[0].shape[-1]))
    context = [torch.randn(5, 4096), torch.randn(9, 4096)]
    with torch.no_grad():
        compact = model.embed_text_rows(context)
        full = model.embed_text(context)
    hook.remove()
    assert isinstance(compact, TextEmbedding) and compact.rows.shape == (2, 9, 64) and compact.pad.shape == (1, 1, 64)
    assert rows == [2 * 9 + 1, 2 * 32]  # prompt rows + one zero row, vs every padded row
    assert rel_err(compact.full(), full) <= 1e-6
    assert torch.equal(compact.full()[1, 9:], compact.pad[0].expand(32 - 9, -1))
    longest = model.embed_text_rows([torch.randn(32, 4096)])
    assert longest.pad is None and longest.full().shape == (1, 32, 64)


def test_forward_with_distinct_text_rows_matches_all_rows():
    model = _dit()
    x, y = torch.randn(2, 16, 2, 4, 6), torch.randn(2, 20, 2, 4, 6)
    context = [torch.randn(5, 4096), torch.randn(9, 4096)]
    padded = torch.stack([torch.cat([c, c.new_zeros(32 - c.shape[0], 4096)]) for c in context])  # no lengths known
    with torch.no_grad():
        out = model(x, torch.tensor([900.0, 900.0]), context, y)
        reference = model(x, torch.tensor([900.0, 900.0]), padded, y)
    assert rel_err(out, reference) <= 1e-5  # [~3e-7]
