"""The pieces behind the reliability guarantees, in-process: image decoding rules, temporary
names that fit NAME_MAX, the mp4 read-back, verified atomic replacement, the cache race, and
the memory preflight's escape hatch."""
from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wanengine.errors import ConfigError, UserInputError
from wanengine.io.atomic import OutputWriteError, atomic_path, temp_name
from wanengine.io.image import BACKGROUND, REDUCE_ABOVE_PIXELS, open_image


# --------------------------------------------------------------------------- images
def test_every_alpha_mode_composites_onto_the_same_background(tmp_path):
    grey_under_transparency = Image.new("LA", (4, 4), (30, 0))
    rgba = Image.new("RGBA", (4, 4), (30, 30, 30, 0))
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    for image in (grey_under_transparency, rgba, palette):
        image.save(tmp_path / "x.png")
        assert open_image(tmp_path / "x.png").getpixel((0, 0)) == BACKGROUND, image.mode
    for image in (Image.new("PA", (4, 4), (0, 0)), Image.new("La", (4, 4), (30, 0)), Image.new("RGBa", (4, 4))):
        assert open_image(image).getpixel((0, 0)) == BACKGROUND, image.mode  # modes PNG cannot store
    half = Image.new("LA", (2, 2), (0, 128))
    assert open_image(half).getpixel((0, 0)) == (127, 127, 127)  # black at half opacity over white


def test_high_bit_depth_modes_are_scaled_by_their_range(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    Image.fromarray(np.full((4, 4), 32768, np.int32), "I").save(tmp_path / "i.tif")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "i16.png")
    assert open_image(tmp_path / "f.tif").getpixel((0, 0)) == (128, 128, 128)
    assert open_image(tmp_path / "i.tif").getpixel((0, 0)) == (128, 128, 128)
    assert open_image(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((4, 4), 700.0, np.float32), "F").save(tmp_path / "wide.tif")
    with pytest.raises(UserInputError, match=r"float image values span \[700, 700\]"):
        open_image(tmp_path / "wide.tif")
    Image.fromarray(np.full((4, 4), -5, np.int32), "I").save(tmp_path / "negative.tif")
    with pytest.raises(UserInputError, match="negative"):
        open_image(tmp_path / "negative.tif")


def test_very_large_images_are_reduced_while_decoding(tmp_path):
    side = int((REDUCE_ABOVE_PIXELS * 1.2) ** 0.5)
    Image.new("L", (side, side), 90).save(tmp_path / "big.png")
    image = open_image(tmp_path / "big.png")
    assert image.size == (side // 2, side // 2) and image.getpixel((0, 0)) == (90, 90, 90)
    Image.new("RGB", (side, side), (10, 200, 30)).save(tmp_path / "big.jpg", quality=95)
    jpeg = open_image(tmp_path / "big.jpg")
    assert jpeg.width * jpeg.height <= REDUCE_ABOVE_PIXELS and max(abs(a - b) for a, b in
                                                                   zip(jpeg.getpixel((5, 5)), (10, 200, 30))) <= 3


def test_not_a_regular_file_is_named(tmp_path):
    with pytest.raises(UserInputError, match="is a directory, not a regular file"):
        open_image(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(UserInputError, match="is a FIFO, not a regular file"):
        open_image(tmp_path / "pipe.png")


# --------------------------------------------------------------------------- writing
def test_temp_names_fit_name_max_for_any_valid_name(tmp_path):
    for name in ("v" * 251 + ".mp4", "é" * 125 + "x.mp4", "a.safetensors"):
        assert len(os.fsencode(name)) <= 255
        temp = temp_name(tmp_path / name)
        assert len(os.fsencode(temp)) <= 255 and temp.endswith(Path(name).suffix) and temp.startswith(".")
        temp.encode("utf-8")  # never half a multi-byte character
        (tmp_path / temp).write_bytes(b"")  # the file system accepts it


def test_mp4_read_back_catches_truncation_and_missing_frames(tmp_path):
    from wanengine.io.mp4 import check_mp4, read_mp4_header
    from wanengine.io.video import Video

    video = Video(tensor=torch.rand(3, 5, 32, 48) * 2 - 1, latent=torch.zeros(16, 2, 4, 6), seed=123,
                  metadata={"settings": {"seed": 123}})
    out = video.save(tmp_path / "ok.mp4")
    frames, comment = read_mp4_header(out)
    assert frames == 5 and '"seed": 123' in comment
    data = out.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) - 200])
    with pytest.raises(OutputWriteError, match="incomplete"):
        check_mp4(tmp_path / "cut.mp4", expected_frames=5)
    with pytest.raises(OutputWriteError, match="holds 5 of 6 frames"):
        check_mp4(out, expected_frames=6)


def test_a_result_that_fails_verification_never_replaces_the_file(tmp_path):
    final = tmp_path / "out.safetensors"
    final.write_bytes(b"previous")

    def reject(path: Path) -> None:
        raise OutputWriteError(f"{final}: does not read back")

    with pytest.raises(OutputWriteError):
        with atomic_path(final, verify=reject) as tmp:
            tmp.write_bytes(b"new but wrong")
    with pytest.raises(OutputWriteError, match="empty file"):
        with atomic_path(final):
            pass
    assert final.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


# --------------------------------------------------------------------------- the shared cache
FILES = ("a.bin", "b.bin", "marker")


def _slow_build(staging: Path) -> None:
    for name in FILES:  # the marker last, with pauses where a racing process could step in
        time.sleep(random.uniform(0, 0.02))
        (staging / name).write_bytes(name.encode() * 100)


def _complete(root: Path) -> None:
    for name in FILES:
        if (root / name).read_bytes() != name.encode() * 100:
            raise ValueError(f"{root / name} is incomplete")


def _race_once(target: str, barrier, results) -> None:
    from wanengine.demo_cache import cached_directory

    barrier.wait()
    try:
        root = cached_directory(Path(target), _slow_build, _complete)
        time.sleep(random.uniform(0, 0.02))
        _complete(root)  # still whole: nobody deleted it while this process used it
        results.put("ok")
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put(f"{type(exc).__name__}: {exc}")


def test_three_way_cache_race_never_breaks_a_result(tmp_path):
    context = multiprocessing.get_context("fork")
    for round_index in range(12):
        target = tmp_path / f"round{round_index}" / "ckpt"
        if round_index % 3 == 2:  # leftovers of a killed builder must be cleaned, not trusted
            target.parent.mkdir()
            (target.parent / ".ckpt-staging-dead").mkdir()
            (target.parent / ".ckpt-staging-dead" / "a.bin").write_bytes(b"half")
        barrier, results = context.Barrier(3), context.Queue()
        workers = [context.Process(target=_race_once, args=(str(target), barrier, results)) for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        outcomes = [results.get(timeout=5) for _ in workers]
        assert outcomes == ["ok"] * 3, (round_index, outcomes)
        assert sorted(p.name for p in target.parent.iterdir()) == [".ckpt.lock", "ckpt"]


def test_an_incomplete_target_is_replaced_not_trusted_and_legacy_staging_goes(tmp_path):
    from wanengine.demo_cache import cached_directory

    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a.bin").write_bytes(b"half")
    (tmp_path / ".demo-c1y2z3w4").mkdir()  # what an older version's killed demo left behind
    (tmp_path / ".demo-notes").write_text("a file, not staging: kept")
    cached_directory(target, _slow_build, _complete, legacy_staging=(".demo-" + "?" * 8,))
    _complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.lock", ".demo-notes", "ckpt"]


# --------------------------------------------------------------------------- bounds and memory
def test_seed_range_and_bounds():
    from wanengine.config import GenerationOptions

    GenerationOptions(prompt="p", seed=2**63 - 1).validate()
    GenerationOptions(prompt="p", seed=-(2**70)).validate()  # negative: draw one
    for options, flag in ((dict(seed=2**63), "seed"), (dict(frame_num=4097), "frame_num"),
                          (dict(steps=1001), "steps")):  # library argument names; the CLI shows the flags
        with pytest.raises(ConfigError, match=flag):
            GenerationOptions(prompt="p", **options).validate()


def test_memory_check_refuses_and_can_be_ignored(golden, golden_ckpt, monkeypatch):
    from wanengine.config import EngineConfig, GenerationOptions
    from wanengine.run import preflight_run

    cfg = EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32")
    opts = GenerationOptions(prompt="p", max_area=12288, frame_num=5, steps=2, seed=1)
    monkeypatch.setenv("WANENGINE_MEMORY_GB", "0.001")
    with pytest.raises(ConfigError, match=r"needs ~0\.\d GB, have 0\.0 GB"):
        preflight_run(cfg, opts, golden / "input.png", None, None)
    plan = preflight_run(cfg, opts, golden / "input.png", Path("clip.mp4"), None, ignore_memory_check=True)
    assert plan.frame_size == (128, 96)
    monkeypatch.setenv("WANENGINE_MEMORY_GB", "lots")
    with pytest.raises(ConfigError, match="WANENGINE_MEMORY_GB"):
        preflight_run(cfg, opts, golden / "input.png", Path("clip.mp4"), None)


def test_library_warnings_become_one_line(capfd):
    import warnings

    import typer

    from wanengine.exits import guarded

    app = typer.Typer()

    @app.command()
    def noisy() -> None:
        warnings.warn("PIL says:\n  something\n    spread over lines", UserWarning)

    @app.command()
    def other() -> None:  # two commands, so the command name is parsed as in the real CLI
        pass

    assert guarded(lambda: app(args=["noisy"], standalone_mode=False)) == 0
    assert capfd.readouterr().err.splitlines() == ["wanengine: warning: PIL says: something spread over lines"]
