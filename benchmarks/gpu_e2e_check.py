"""The golden end-to-end case on a GPU: float32 (TF32 off) and bfloat16 against the reference
video, with expert offload on (the accelerator default), printing errors, swaps and stage times.

    python benchmarks/gpu_e2e_check.py GOLDEN_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import wanengine.engine as engine_module
from wanengine import Engine, EngineConfig
from wanengine.pipeline import initial_noise


def cpu_noise(seed, shape, device):
    """The golden run drew its noise from the CPU generator; a CUDA generator gives other
    numbers for the same seed, so for this comparison the noise is drawn on the CPU."""
    return initial_noise(seed, shape, torch.device("cpu")).to(device)


def counting_syncs(denoise):
    """Wrap the denoising loop with CUDA's sync-debug mode and count the host syncs it makes."""
    import warnings

    def wrapped(**kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return denoise(**kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                SYNCS.append([str(w.message).splitlines()[0][:120] for w in caught])

    return wrapped


SYNCS: list = []


def main(golden: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    meta = json.loads((golden / "meta.json").read_text())["i2v"]
    ref = load_file(str(golden / "i2v.safetensors"))
    engine_module.initial_noise = cpu_noise
    engine_module.denoise = counting_syncs(engine_module.denoise)
    for dtype in ("float32", "bfloat16"):
        engine = Engine(EngineConfig(ckpt_dir=str(golden / "ckpt"), device="cuda", dtype=dtype, progress=False))
        video = engine.i2v(golden / "input.png", meta["prompt"], negative_prompt=meta["n_prompt"],
                           max_area=meta["max_area"], frame_num=meta["frame_num"], steps=meta["steps"],
                           shift=meta["shift"], solver=meta["solver"], guide_scale=tuple(meta["guide_scale"]),
                           seed=meta["seed"])
        latent_rel = float((video.latent - ref["latents"][-1]).abs().max() / ref["latents"][-1].abs().max())
        print(json.dumps({"dtype": dtype, "device": torch.cuda.get_device_name(), "kernel_backend": engine.kernel_backend,
                          "offload": engine.offload, "expert_swaps": engine.experts.swaps,
                          "video_max_abs": float((video.tensor - ref["video"]).abs().max()),
                          "latent_rel": latent_rel, "timings_s": video.metadata["timings_s"],
                          "host_syncs_in_denoise": SYNCS[-1]}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
