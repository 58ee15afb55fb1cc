"""`wanengine demo` as a real subprocess: a playable video with the right number of frames, the
input image beside it, the side-by-side preview, and the device and dtype it ran on."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO_ROOT


@pytest.mark.slow
def test_demo_writes_a_playable_video_its_input_and_a_preview(tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    from wanengine.demo import DEMO_SETTINGS, demo_image

    out = tmp_path / "demo.mp4"
    env = {**os.environ, "WANENGINE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), "demo", "--out", str(out), "--device", "cpu",
                             "--dtype", "float32"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frames = iio.imread(out)
    assert frames.shape[0] == DEMO_SETTINGS["frame_num"] and frames.shape[-1] == 3
    assert frames.std() > 1.0  # not a blank clip
    assert "VAE decode" in result.stderr and "wrote" in result.stderr  # the stage table and summary
    assert "on cpu (float32" in result.stderr
    assert (tmp_path / "cache" / "demo-ckpt-v1" / "high_noise_model" /
            "diffusion_pytorch_model.safetensors.index.json").is_file()

    with Image.open(tmp_path / "demo_input.png") as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(demo_image()))
    height, width = frames.shape[1:3]
    with Image.open(tmp_path / "demo_preview.png") as preview:
        sheet = np.asarray(preview.convert("RGB"))
    scale = 2 if height < 256 else 1
    assert sheet.shape == (scale * height, scale * (3 * width + 8), 3)
    first = sheet[::scale, ::scale][:, width + 4:2 * width + 4]
    assert np.abs(first.astype(int) - frames[0].astype(int)).mean() < 8  # the video's first frame (mp4 is lossy)
    assert not list(tmp_path.glob("*.partial*"))


def test_demo_rejects_a_bad_device_as_a_usage_error(tmp_path):
    from wanengine import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--out", str(tmp_path / "d.mp4"), "--device", "gpu"])
    assert info.value.code == 2 and not (tmp_path / "d.mp4").exists()


def test_demo_checks_its_companion_pngs_before_any_work(tmp_path, capsys):
    from wanengine import cli

    (tmp_path / "d_preview.png").mkdir()  # where the preview would go
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--out", str(tmp_path / "d.mp4"), "--device", "cpu",
                  "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "d_preview.png is a directory" in err[0], err
    assert not (tmp_path / "d.mp4").exists() and not (tmp_path / "cache").exists()  # nothing built or written


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
