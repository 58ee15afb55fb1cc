"""`wanengine demo` as a real subprocess: a playable video with the right number of frames."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT


@pytest.mark.slow
def test_demo_writes_a_playable_video(tmp_path):
    import imageio.v3 as iio

    from wanengine.demo import DEMO_SETTINGS

    out = tmp_path / "demo.mp4"
    env = {**os.environ, "WANENGINE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), "demo", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frames = iio.imread(out)
    assert frames.shape[0] == DEMO_SETTINGS["frame_num"] and frames.shape[-1] == 3
    assert frames.std() > 1.0  # not a blank clip
    assert "VAE decode" in result.stderr and "wrote" in result.stderr  # the stage table and summary
    assert (tmp_path / "cache" / "demo-ckpt-v1" / "high_noise_model" /
            "diffusion_pytorch_model.safetensors.index.json").is_file()


@pytest.mark.slow
def test_concurrent_demos_on_one_cache_all_succeed(tmp_path):
    """Three `wanengine demo` processes racing to build one fresh cache: all succeed
    (the lock and the verified rename never hand out or delete a partial checkpoint) and no
    staging directory is left behind."""
    import shutil

    cache = tmp_path / "cache"
    for round_index in range(1):  # ~20 s a round; the building function races 12 rounds in test_reliability_units
        env = {**os.environ, "WANENGINE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        runs = [subprocess.Popen([sys.executable, str(REPO_ROOT / "cli.py"), "--quiet", "demo", "--out",
                                  str(tmp_path / f"demo{round_index}-{i}.mp4")], env=env, cwd=tmp_path,
                                 stderr=subprocess.PIPE, text=True) for i in range(3)]
        outcomes = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
        assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
        assert sorted(p.name for p in cache.iterdir()) == [".demo-ckpt-v1.lock", "demo-ckpt-v1"]
        shutil.rmtree(cache)
