"""Deterministic runs, the NaN/Inf guard, metrics output, and no output file on failure."""
from __future__ import annotations

import json

import pytest
import torch

from wanengine.errors import NumericalError

SMALL = dict(max_area=64 * 48, frame_num=5, steps=6, shift=5.0, guide_scale=3.5)


@pytest.fixture(scope="module")
def engine(golden_ckpt):
    from wanengine import Engine, EngineConfig

    return Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", progress=False))


def test_same_seed_same_bits(engine, golden):
    first = engine.i2v(golden / "input.png", "a cat", seed=99, **SMALL)
    second = engine.i2v(golden / "input.png", "a cat", seed=99, **SMALL)
    assert torch.equal(first.tensor, second.tensor) and torch.equal(first.latent, second.latent)
    other = engine.i2v(golden / "input.png", "a cat", seed=100, **SMALL)
    assert not torch.equal(first.latent, other.latent)


def test_drawn_seed_is_reported_and_reproduces(engine, golden):
    drawn = engine.i2v(golden / "input.png", "a cat", seed=-1, **SMALL)
    assert drawn.seed >= 0 and drawn.metadata["settings"]["seed"] == drawn.seed
    again = engine.i2v(golden / "input.png", "a cat", seed=drawn.seed, **SMALL)
    assert torch.equal(drawn.latent, again.latent)


def test_nan_guard_names_step_timestep_and_expert(engine, golden, monkeypatch):
    low = engine.experts.experts["low_noise_model"]
    original = type(low).forward

    def poisoned(self, *args, **kwargs):
        return original(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(type(low), "forward", lambda self, *a, **k: poisoned(self, *a, **k)
                        if self is low else original(self, *a, **k))
    with pytest.raises(NumericalError) as info:
        engine.i2v(golden / "input.png", "a cat", seed=1, **SMALL)
    message = str(info.value)
    # 6 steps at shift 5: 999, 961, 908 (high noise), then 833 is the first low-noise step
    assert "step 4/6" in message and "timestep 833" in message and "low_noise_model" in message


def test_cli_metrics_json_and_no_file_on_failure(golden, golden_ckpt, tmp_path, monkeypatch):
    from wanengine import cli
    from wanengine.engine import Engine

    out = tmp_path / "clip.safetensors"
    metrics = tmp_path / "metrics.json"
    args = ["--quiet", "i2v", "--ckpt-dir", str(golden_ckpt), "--image", str(golden / "input.png"),
            "--prompt", "a cat", "--max-area", str(SMALL["max_area"]), "--frame-num", "5", "--sample-steps", "2",
            "--seed", "5", "--device", "cpu", "--dtype", "float32", "--out", str(out),
            "--metrics-json", str(metrics)]
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code in (0, None)
    payload = json.loads(metrics.read_text())
    assert payload["settings"]["seed"] == 5 and payload["output"] == str(out)
    assert {"load", "text encode", "VAE encode", "denoise", "VAE decode", "write"} <= set(payload["timings_s"])
    assert payload["versions"]["torch"] == torch.__version__
    out.unlink()
    metrics.unlink()

    def fail_midway(self, image, opts, **kwargs):
        raise NumericalError("non-finite values (NaN/Inf) in the latent after step 1/2")

    monkeypatch.setattr(Engine, "generate", fail_midway)
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 1
    assert list(tmp_path.iterdir()) == []


def test_offload_gives_the_same_bits_and_moves_each_model_in_once(engine, golden, golden_ckpt):
    """With offload the text encoder visits the run device only to encode and the experts take
    turns; on the CPU the moves are no-ops, so the result must be bit-identical."""
    from wanengine import Engine, EngineConfig

    offloaded = Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", progress=False,
                                    offload_model=True))
    got = offloaded.i2v(golden / "input.png", "a cat", seed=3, **SMALL)
    want = engine.i2v(golden / "input.png", "a cat", seed=3, **SMALL)
    assert torch.equal(got.tensor, want.tensor)
    assert offloaded.t5_visits is not None and offloaded.t5_visits.swaps == 1
    assert offloaded.t5_visits._resident is None  # released after encoding
    assert offloaded.experts.swaps == 2  # high-noise in, then low-noise in at the boundary
    assert engine.t5_visits is None and engine.experts.swaps == 0
