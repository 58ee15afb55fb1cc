"""Distilled experts as one `.safetensors` per expert (LightX2V / ComfyUI style; loading them is
`io.formats.dit_single`): sampled with flow Euler and guidance off, with a LoRA on top, they
give exactly the run on the same weights in the released directory layout."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_helpers import LINEAR_TARGETS, expert_shapes, lora_tensors, random_lora, write_lora

EXPERTS = ("high_noise_model", "low_noise_model")


def test_single_file_experts_with_euler_guidance_off_and_a_lora(tmp_path: Path, golden: Path, golden_ckpt: Path):
    from wanengine import Engine, EngineConfig
    from wanengine.adapters import LoraSpec
    from wanengine.presets import preset_values

    files = {}
    for expert, prefix in zip(EXPERTS, ("model.diffusion_model.", "")):
        tensors = {}
        for shard in sorted((golden_ckpt / expert).glob("*.safetensors")):
            tensors.update(load_file(str(shard)))
        files[expert] = tmp_path / f"wan2.2_i2v_A14b_{expert.split('_')[0]}_noise_lightx2v_4step.safetensors"
        save_file({prefix + k: v for k, v in tensors.items()}, str(files[expert]))
    lora = write_lora(tmp_path / "low_noise_model.safetensors",
                      lora_tensors(random_lora(expert_shapes(golden_ckpt / "low_noise_model"), LINEAR_TARGETS, seed=9),
                                   prefix="diffusion_model."))
    common = dict(device="cpu", dtype="float32", progress=False, loras=[LoraSpec(str(lora), 0.9, "low")])
    engines = [Engine(EngineConfig(ckpt_dir=str(golden_ckpt), high_noise_model=str(files[EXPERTS[0]]),
                                   low_noise_model=str(files[EXPERTS[1]]), **common)),
               Engine(EngineConfig(ckpt_dir=str(golden_ckpt), **common))]
    for engine in engines:  # the latents are compared: skip the (deterministic) VAE decode
        engine.decode = lambda z: torch.empty(3, 0, 8 * z.shape[-2], 8 * z.shape[-1])
    call = dict(image=golden / "input.png", prompt="a cat", max_area=12288, frame_num=5, seed=5,
                **preset_values("distill-4step"))
    single, released = (engine.i2v(**call) for engine in engines)
    assert single.metadata["dit_forwards"] == 4 and len(single.metadata["adapters"]) == 1
    assert torch.equal(single.latent, released.latent)
