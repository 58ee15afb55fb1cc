"""The command-line options that point at weights, shared by `i2v`, `info` and `convert`:
`--ckpt-dir` (released layout or diffusers repository) and one option per component."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import typer

PANEL = "Weights (any layout)"


def ckpt_dir_option(panel: Optional[str] = None):
    return typer.Option(None, "--ckpt-dir", rich_help_panel=panel,
                        help="Checkpoint directory: the released Wan2.2-I2V-A14B layout or a diffusers "
                             "repository (Wan2.2-I2V-A14B-Diffusers). Optional when every component is given.")


def high_noise_option():
    return typer.Option(None, "--high-noise-model", rich_help_panel=PANEL,
                        help="High-noise expert: a directory or one .safetensors "
                             "(ComfyUI's wan2.2_i2v_high_noise_14B_fp16, LightX2V's, ...).")


def low_noise_option():
    return typer.Option(None, "--low-noise-model", rich_help_panel=PANEL,
                        help="Low-noise expert: a directory or one .safetensors.")


def t5_option():
    return typer.Option(None, "--t5", rich_help_panel=PANEL,
                        help="Text encoder: .pth, one .safetensors (e.g. umt5_xxl_fp16.safetensors) or a "
                             "transformers text_encoder/ directory.")


def vae_option():
    return typer.Option(None, "--vae", rich_help_panel=PANEL,
                        help="VAE: .pth, .safetensors (e.g. wan_2.1_vae.safetensors) or a diffusers vae/ directory.")


def tokenizer_option():
    return typer.Option(None, "--tokenizer", rich_help_panel=PANEL,
                        help="spiece.model, or a directory holding it.")


def dit_config_option():
    return typer.Option(None, "--dit-config", rich_help_panel=PANEL,
                        help="config.json for single-file experts (default: inferred from tensor shapes).")


def weight_sources(ckpt_dir: Optional[Path], high_noise_model: Optional[Path], low_noise_model: Optional[Path],
                   t5: Optional[Path], vae: Optional[Path], tokenizer: Optional[Path],
                   dit_config: Optional[Path]) -> Dict[str, Optional[str]]:
    """The options as `EngineConfig` fields (strings, None when not given)."""
    values = {"ckpt_dir": ckpt_dir, "high_noise_model": high_noise_model, "low_noise_model": low_noise_model,
              "t5": t5, "vae": vae, "tokenizer": tokenizer, "dit_config": dit_config}
    return {k: (str(v) if v is not None else None) for k, v in values.items()}
