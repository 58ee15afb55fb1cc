"""Where does the denoising loop synchronise with the GPU? Runs the golden case in bf16 with
CUDA's sync-debug mode on during `denoise` and prints each distinct call site (our frames).

    python benchmarks/gpu_sync_trace.py GOLDEN_DIR
"""
from __future__ import annotations

import collections
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

import wanengine.engine as engine_module
from wanengine import Engine, EngineConfig

SITES: collections.Counter = collections.Counter()


def _record(message, category, filename, lineno, file=None, line=None):
    frames = [f for f in traceback.extract_stack()[:-1] if "wanengine" in f.filename]
    SITES[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1


def traced(denoise):
    def wrapped(**kwargs):
        previous = warnings.showwarning
        warnings.showwarning = _record
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return denoise(**kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = previous

    return wrapped


def main(golden: Path) -> None:
    meta = json.loads((golden / "meta.json").read_text())["i2v"]
    engine_module.denoise = traced(engine_module.denoise)
    engine = Engine(EngineConfig(ckpt_dir=str(golden / "ckpt"), device="cuda", dtype="bfloat16", progress=False))
    engine.i2v(golden / "input.png", meta["prompt"], max_area=meta["max_area"], frame_num=meta["frame_num"],
               steps=meta["steps"], seed=meta["seed"])
    for site, count in SITES.most_common():
        print(f"{count:4d}  {site}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
