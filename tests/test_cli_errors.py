"""Bad input through the real CLI subprocess: a non-zero exit, one line naming the file or
flag, no traceback, and no output file -- all before any weight is read."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from helpers import REPO_ROOT, assert_one_line_usage_error, run_cli

SHARD = "high_noise_model/diffusion_pytorch_model-00002-of-00007.safetensors"
INDEX = "high_noise_model/diffusion_pytorch_model.safetensors.index.json"


def _variant(golden_ckpt: Path, root: Path, changes: Dict[str, Optional[Callable[[bytes], bytes]]]) -> Path:
    """A checkpoint of symlinks to the golden files, except `changes`: relative path -> a
    function of the original bytes (the file is rewritten) or None (the file is left out)."""
    for source in golden_ckpt.rglob("*"):
        rel = source.relative_to(golden_ckpt).as_posix()
        target = root / rel
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif rel in changes:
            if changes[rel] is not None:
                target.write_bytes(changes[rel](source.read_bytes()))
        else:
            target.symlink_to(source)
    return root


def _drop_from_index(raw: bytes) -> bytes:
    index = json.loads(raw)
    index["weight_map"].pop("blocks.1.ffn.2.weight")
    return json.dumps(index).encode()


CKPT_CASES = {
    "truncated shard": ({SHARD: lambda b: b[: len(b) // 2]}, [SHARD.split("/")[-1], "truncated"]),
    "tensor missing from index": ({INDEX: _drop_from_index}, ["blocks.1.ffn.2.weight", "missing"]),
    "corrupt VAE": ({"Wan2.1_VAE.pth": lambda b: b"\x00garbage" * 100}, ["Wan2.1_VAE.pth"]),
    "truncated VAE": ({"Wan2.1_VAE.pth": lambda b: b[: len(b) - 4096]}, ["Wan2.1_VAE.pth"]),
    "missing spiece.model": ({"google/umt5-xxl/spiece.model": None}, ["spiece.model"]),
    "missing T5": ({"models_t5_umt5-xxl-enc-bf16.pth": None}, ["models_t5_umt5-xxl-enc-bf16.pth"]),
}

# (extra args replacing defaults, words the message must contain)
FLAG_CASES = {
    "missing checkpoint directory": ({"--ckpt-dir": "{tmp}/no-such-ckpt"}, ["--ckpt-dir", "not found"]),
    "image that is not an image": ({"--image": "{tmp}/notes.png"}, ["--image", "not a readable image"]),
    "missing image": ({"--image": "{tmp}/missing.png"}, ["--image", "not found"]),
    "frame num 80": ({"--frame-num": "80"}, ["--frame-num", "4n+1"]),
    "max area 10": ({"--max-area": "10"}, ["--max-area"]),
    "sample steps 0": ({"--sample-steps": "0"}, ["--sample-steps"]),
    "unknown solver": ({"--sample-solver": "heun"}, ["--sample-solver", "heun"]),
    "guidance not finite": ({"--guide-scale": "nan"}, ["--guide-scale"]),
    "ulysses without torchrun": ({"--ulysses-size": "2"}, ["torchrun"]),
    "ulysses not dividing heads": ({"--ulysses-size": "3"}, ["--ulysses-size", "heads"]),
    "output directory missing": ({"--out": "{tmp}/no-dir/out.mp4"}, ["--out", "does not exist"]),
    "output extension": ({"--out": "{tmp}/out.gif"}, ["--out", "extension"]),
    "unknown dtype": ({"--dtype": "fp8"}, ["--dtype"]),
}


def _run_cli(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(["i2v", *args], cwd)


def _assert_clean_failure(result: subprocess.CompletedProcess, words: List[str], out_dir: Path) -> None:
    assert_one_line_usage_error(result, words)
    assert not [p for p in out_dir.rglob("*") if p.suffix in (".mp4", ".safetensors")]


def _base_args(ckpt: Path, golden: Path, out_dir: Path) -> Dict[str, str]:
    return {"--ckpt-dir": str(ckpt), "--image": str(golden / "input.png"), "--prompt": "a cat",
            "--max-area": "12288", "--frame-num": "5", "--sample-steps": "2", "--device": "cpu",
            "--dtype": "float32", "--out": str(out_dir / "out.mp4")}


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_bad_checkpoint(case, golden, golden_ckpt, tmp_path):
    changes, words = CKPT_CASES[case]
    ckpt = _variant(golden_ckpt, tmp_path / "ckpt", changes)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = _base_args(ckpt, golden, out_dir)
    result = _run_cli([x for kv in args.items() for x in kv], tmp_path)
    _assert_clean_failure(result, words, out_dir)


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flag_or_input(case, golden, golden_ckpt, tmp_path):
    overrides, words = FLAG_CASES[case]
    (tmp_path / "notes.png").write_text("this is not a picture")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = _base_args(golden_ckpt, golden, out_dir)
    args.update({k: v.format(tmp=tmp_path) for k, v in overrides.items()})
    result = _run_cli([x for kv in args.items() for x in kv], tmp_path)
    _assert_clean_failure(result, words, tmp_path)


def test_debug_shows_the_traceback(golden, golden_ckpt, tmp_path):
    args = _base_args(golden_ckpt, golden, tmp_path)
    args["--frame-num"] = "80"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), "--debug", "i2v",
                             *[x for kv in args.items() for x in kv]], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr
