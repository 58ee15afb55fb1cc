"""The library as a Python user meets it: image inputs of every common kind, errors that name
the argument (ValueError subclasses), a short Video repr, uint8 numpy frames and PIL frames,
on_step with StepInfo, and cancelling a run from on_step."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from wanengine.errors import GenerationCancelled, InvalidArgument
from wanengine.io.image import open_image
from wanengine.io.video import Video

SMALL = dict(max_area=64 * 48, frame_num=1, steps=2, shift=5.0, guide_scale=3.5)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))


def test_every_image_input_gives_the_same_rgb(picture, tmp_path):
    pixels = np.array(picture)
    path = tmp_path / "in.png"
    picture.save(path)
    encoded = path.read_bytes()
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    inputs = {
        "path": path, "str": str(path), "bytes": encoded, "bytearray": bytearray(encoded),
        "file object": io.BytesIO(encoded), "PIL": picture, "numpy uint8 HWC": pixels,
        "numpy float HWC": pixels / 255.0, "torch uint8 CHW": chw, "torch float CHW": chw.float() / 255,
        "torch float 1CHW": chw[None].float() / 255, "torch bfloat16 HWC": torch.from_numpy(pixels / 255.0).bfloat16(),
        "RGBA numpy": np.concatenate([pixels, np.full((24, 32, 1), 255, np.uint8)], axis=-1),
    }
    for name, value in inputs.items():
        got = np.asarray(open_image(value))
        assert got.shape == (24, 32, 3), name
        tolerance = 2 if "bfloat16" in name else 0  # bf16 keeps 8 bits of mantissa
        assert np.abs(got.astype(int) - pixels).max() <= tolerance, name
    grey = open_image(pixels[..., 0])
    assert grey.mode == "RGB" and np.array_equal(np.asarray(grey)[..., 1], pixels[..., 0])


@pytest.mark.parametrize("value, fragment", [
    (np.zeros((4, 4, 3)) - 0.5, "pass (x + 1) / 2"),
    (torch.zeros(2, 3, 4, 5), "is not an image"),  # a batch of two
    (np.zeros(7), "is not an image"),
    (np.full((4, 4), 300, dtype=np.int32), "0..255"),
    (b"not an image at all", "not a readable image"),
    ("/no/such/file.png", "file not found"),
    (12345, "unsupported type int"),
])
def test_bad_images_name_the_argument(value, fragment):
    with pytest.raises(InvalidArgument) as info:
        open_image(value)
    error = info.value
    assert isinstance(error, ValueError) and error.argument == "image" and str(error).startswith("image: ")
    assert "--image" not in str(error) and "\n" not in str(error)
    if fragment:
        assert fragment in str(error)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # crosses process boundaries intact


def test_size_as_a_pair():
    from wanengine.config import GenerationOptions, parse_size

    assert parse_size((832, 480)) == parse_size("832*480") == (832, 480)
    assert GenerationOptions(prompt="p", size=(832, 480)).validate().resolved_max_area == 832 * 480
    with pytest.raises(InvalidArgument, match="^size: "):
        parse_size((832, 480, 3))


def test_video_repr_frames_and_pil():
    tensor = torch.linspace(-1, 1, 3 * 5 * 8 * 12).reshape(3, 5, 8, 12)
    video = Video(tensor=tensor, latent=torch.zeros(16, 2, 1, 1), fps=16, seed=7)
    assert repr(video) == "Video(5 frames of 12x8 at 16 fps (0.31 s), seed 7)"
    frames = video.frames
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.shape == (5, 8, 12, 3)
    pil = video.to_pil()
    assert len(pil) == 5 and pil[0].size == (12, 8) and pil[0].mode == "RGB"
    assert np.array_equal(np.asarray(pil[-1]), frames[-1])


@pytest.fixture(scope="module")
def engine(golden_ckpt):
    from wanengine import Engine, EngineConfig

    return Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", progress=False))


def test_engine_errors_name_the_argument(engine, golden):
    for kwargs, argument in ((dict(frame_num=80), "frame_num"), (dict(steps=0), "steps"),
                             (dict(solver="heun"), "solver"), (dict(guide_scale="x"), "guide_scale"),
                             (dict(size="big"), "size")):
        with pytest.raises(ValueError) as info:
            engine.i2v(golden / "input.png", "a cat", **{**SMALL, **kwargs})
        assert isinstance(info.value, InvalidArgument) and info.value.argument == argument
        assert str(info.value).startswith(f"{argument}: ") and "--" not in str(info.value)
    with pytest.raises(InvalidArgument, match="^image: "):
        engine.i2v(np.zeros((2, 2, 3)) - 1.0, "a cat", **SMALL)


def test_on_step_reports_and_cancelling_leaves_the_engine_usable(engine, golden):
    seen = []
    first = engine.i2v(golden / "input.png", "a cat", seed=11, on_step=lambda info, latent: seen.append(info),
                       **SMALL)
    assert [(s.index, s.num_steps) for s in seen] == [(0, 2), (1, 2)]
    assert {s.expert for s in seen} <= {"high_noise_model", "low_noise_model"} and seen[0].timestep == 999

    def cancel(info, latent):
        if info.index == 0:
            raise GenerationCancelled("stopped by the caller")

    with pytest.raises(GenerationCancelled, match="stopped by the caller"):
        engine.i2v(golden / "input.png", "a cat", seed=11, on_step=cancel, **SMALL)
    again = engine.i2v(golden / "input.png", "a cat", seed=11, **SMALL)
    assert torch.equal(first.latent, again.latent) and torch.equal(first.tensor, again.tensor)
    assert again.frames.dtype == np.uint8 and repr(again).startswith("Video(1 frames of ")


def test_a_checked_layout_is_not_checked_again(golden_ckpt, monkeypatch):
    """The CLI's and the server's preflight hand their checked layout to the engine: its headers
    are read once, and adapters are planned from the shapes the preflight recorded."""
    import wanengine.engine as engine_module
    from wanengine import Engine, EngineConfig
    from wanengine.io.checkpoint import EXPERTS, preflight_checkpoint

    layout = preflight_checkpoint(str(golden_ckpt))
    assert set(layout.expert_shapes) == set(EXPERTS) and layout.expert_shapes[EXPERTS[0]]["head.head.weight"]
    monkeypatch.setattr(engine_module, "preflight_checkpoint", lambda *a, **k: pytest.fail("checked twice"))
    engine = Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", progress=False),
                    layout=layout)
    assert engine.layout is layout
