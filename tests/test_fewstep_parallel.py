"""Few-step runs in real multi-process jobs (gloo on CPU) against the single process:
CFG parallel with guidance off on one expert only (the pair agrees bit for bit and counts the
video's forwards), and LoRA adapters merged into FSDP shards under Ulysses (each rank's merged
shards equal a single-process merge; the video equals the single-process run)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from _parallel_worker import launch
from helpers import rel_err
from lora_helpers import LINEAR_TARGETS, expert_shapes, kohya, lora_tensors, random_lora, write_lora

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]

LATENT_REL = 1e-5  # float32 CPU, summation order only (CFG batch of 1 vs 2; Ulysses attention split)


def single_process_latent(golden_ckpt: Path, golden: Path, guide, loras=()) -> torch.Tensor:
    from wanengine import Engine, EngineConfig

    engine = Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", progress=False,
                                 loras=list(loras)))
    engine.decode = lambda z: torch.empty(3, 0, 8 * z.shape[-2], 8 * z.shape[-1])  # latents are compared
    video = engine.i2v(golden / "input.png", "a cat", max_area=12288, frame_num=5, steps=4, shift=5.0,
                       solver="euler", guide_scale=guide, seed=3)
    return video.latent, video.metadata["dit_forwards"]


def test_cfg_parallel_with_guidance_off_on_one_expert(golden: Path, golden_ckpt: Path, tmp_path: Path) -> None:
    reports = launch(2, "fewstep", tmp_path, ["--cfg-size", "2"], timeout=240)
    assert [r["dit_forwards"] for r in reports] == [6, 6]  # 2 high steps x 2 + 2 low steps x 1
    latents = [load_file(str(tmp_path / f"latent{r}.safetensors"))["latent"] for r in range(2)]
    assert torch.equal(latents[0], latents[1])  # both branches stepped identically
    want, forwards = single_process_latent(golden_ckpt, golden, (1.0, 3.5))
    assert forwards == 6 and rel_err(latents[0], want) <= LATENT_REL


def test_lora_into_fsdp_shards_under_ulysses(golden: Path, golden_ckpt: Path, tmp_path: Path) -> None:
    from wanengine.adapters import LoraSpec

    shapes = expert_shapes(golden_ckpt / "low_noise_model")
    both = write_lora(tmp_path / "lora_both.safetensors",
                      lora_tensors(random_lora(shapes, LINEAR_TARGETS, seed=7), prefix="diffusion_model."))
    high = write_lora(tmp_path / "lora_high.safetensors",
                      lora_tensors(random_lora(shapes, LINEAR_TARGETS[2:], rank=3, alpha=6.0, seed=8), rename=kohya))
    reports = launch(2, "fewstep", tmp_path, ["--ulysses-size", "2", "--dit-fsdp"], timeout=240)
    assert all(r["fsdp_params_equal_single_merge"] for r in reports)
    assert all(r["dit_forwards"] == 4 and len(r["adapters"]) == 3 for r in reports)
    latents = [load_file(str(tmp_path / f"latent{r}.safetensors"))["latent"] for r in range(2)]
    assert torch.equal(latents[0], latents[1])
    want, _ = single_process_latent(golden_ckpt, golden, (1.0, 1.0),
                                    [LoraSpec(str(both), 0.8, "both"), LoraSpec(str(high), 1.0, "high")])
    assert rel_err(latents[0], want) <= LATENT_REL
