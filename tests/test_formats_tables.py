"""The VAE (diffusers) and UMT5 (transformers) naming tables follow spec `formats.md`, are
bijections on the golden names, and load to the released weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from formats_writers import pth_tensors
from wanengine.errors import CheckpointError
from wanengine.io.formats.umt5_transformers import is_transformers_umt5, to_released_t5_name, to_transformers_t5_name
from wanengine.io.formats.vae_diffusers import is_diffusers_vae, to_diffusers_vae_name, to_released_namer
from wanengine.models.t5 import load_t5
from wanengine.models.vae import load_vae

T5 = "models_t5_umt5-xxl-enc-bf16.pth"


def test_vae_table_follows_the_spec(golden_ckpt):
    spec = {
        "quant_conv.weight": "conv1.weight", "post_quant_conv.bias": "conv2.bias",
        "encoder.conv_in.weight": "encoder.conv1.weight", "decoder.conv_in.bias": "decoder.conv1.bias",
        "encoder.norm_out.gamma": "encoder.head.0.gamma", "decoder.conv_out.weight": "decoder.head.2.weight",
        "encoder.mid_block.resnets.1.norm1.gamma": "encoder.middle.2.residual.0.gamma",
        "decoder.mid_block.resnets.0.conv2.weight": "decoder.middle.0.residual.6.weight",
        "decoder.mid_block.attentions.0.to_qkv.weight": "decoder.middle.1.to_qkv.weight",
        "encoder.down_blocks.3.conv_shortcut.bias": "encoder.downsamples.3.shortcut.bias",
        "encoder.down_blocks.5.time_conv.weight": "encoder.downsamples.5.time_conv.weight",
        "decoder.up_blocks.1.resnets.0.norm2.gamma": "decoder.upsamples.4.residual.3.gamma",
        "decoder.up_blocks.2.resnets.2.conv1.weight": "decoder.upsamples.10.residual.2.weight",
        "decoder.up_blocks.0.upsamplers.0.resample.1.weight": "decoder.upsamples.3.resample.1.weight",
    }
    rename = to_released_namer(spec)
    for diffusers, released in spec.items():
        assert rename(diffusers) == released and to_diffusers_vae_name(released) == diffusers
    names = list(pth_tensors(golden_ckpt / "Wan2.1_VAE.pth"))
    diffusers_names = [to_diffusers_vae_name(n) for n in names]
    assert [to_released_namer(diffusers_names)(n) for n in diffusers_names] == names
    assert is_diffusers_vae(diffusers_names) and not is_diffusers_vae(names)


def test_umt5_table_follows_the_spec(golden_ckpt):
    spec = {
        "shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight",
        "encoder.block.1.layer.0.layer_norm.weight": "blocks.1.norm1.weight",
        "encoder.block.1.layer.0.SelfAttention.o.weight": "blocks.1.attn.o.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "blocks.0.pos_embedding.embedding.weight",
        "encoder.block.1.layer.1.layer_norm.weight": "blocks.1.norm2.weight",
        "encoder.block.1.layer.1.DenseReluDense.wi_0.weight": "blocks.1.ffn.gate.0.weight",
        "encoder.block.1.layer.1.DenseReluDense.wi_1.weight": "blocks.1.ffn.fc1.weight",
        "encoder.block.1.layer.1.DenseReluDense.wo.weight": "blocks.1.ffn.fc2.weight",
    }
    for transformers, released in spec.items():
        assert to_released_t5_name(transformers) == released and to_transformers_t5_name(released) == transformers
    assert to_released_t5_name("encoder.embed_tokens.weight") == "token_embedding.weight"
    names = list(pth_tensors(golden_ckpt / T5))
    assert [to_released_t5_name(to_transformers_t5_name(n)) for n in names] == names
    assert is_transformers_umt5([to_transformers_t5_name(n) for n in names]) and not is_transformers_umt5(names)


def test_diffusers_vae_safetensors_loads_the_released_weights(golden_ckpt, tmp_path):
    state = pth_tensors(golden_ckpt / "Wan2.1_VAE.pth")
    save_file({to_diffusers_vae_name(n): t for n, t in state.items()}, str(tmp_path / "vae.safetensors"))
    loaded = load_vae(tmp_path / "vae.safetensors").state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in state.items())


def test_transformers_encoder_with_only_embed_tokens(golden_ckpt, tmp_path):
    state = pth_tensors(golden_ckpt / T5)
    renamed = {to_transformers_t5_name(n): t for n, t in state.items()}
    renamed["encoder.embed_tokens.weight"] = renamed.pop("shared.weight")
    save_file(renamed, str(tmp_path / "umt5.safetensors"))
    loaded = load_t5(tmp_path / "umt5.safetensors", dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in state.items())


def test_vae_of_an_unknown_kind_is_refused(tmp_path):
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="vae.ckpt.*.pth or .safetensors"):
        load_vae(tmp_path / "vae.ckpt")
