"""Sharded loading from the other layouts: `--dit-fsdp --t5-fsdp` under torchrun (gloo, 2 CPU
ranks) from ComfyUI-style single files -- prefixed experts, a transformers-named encoder, a
single-file VAE -- reproduces the golden video."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch.distributed as dist

from _parallel_worker import free_port
from formats_writers import write_comfy_files
from test_parallel_e2e import assert_matches_golden, torchrun_command

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]


def test_fsdp_from_single_files_under_torchrun(golden, golden_ckpt, tmp_path):
    files = write_comfy_files(golden_ckpt, tmp_path / "comfy", "model.diffusion_model.")
    meta = json.loads((golden / "meta.json").read_text())["i2v"]
    out = tmp_path / "run" / "x.safetensors"
    out.parent.mkdir()
    cmd = [*torchrun_command(), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "wanengine.cli", "i2v", "--image", str(golden / "input.png"), "--prompt", meta["prompt"],
           "--max-area", str(meta["max_area"]), "--frame-num", str(meta["frame_num"]),
           "--sample-steps", str(meta["steps"]), "--sample-shift", str(meta["shift"]),
           "--sample-solver", meta["solver"], "--guide-scale", ",".join(str(g) for g in meta["guide_scale"]),
           "--seed", str(meta["seed"]), "--ulysses-size", "2", "--dit-fsdp", "--t5-fsdp", "--dtype", "float32",
           "--device", "cpu", "--out", str(out), "--tokenizer", str(golden_ckpt / "google" / "umt5-xxl"),
           *[x for name, path in files.items() for x in (f"--{name.replace('_', '-')}", str(path))]]
    result = subprocess.run(cmd, cwd=out.parent, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_matches_golden(golden, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.safetensors"]
