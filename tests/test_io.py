"""Image input (EXIF, modes, bad files) and video output (formats, atomic writes)."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from wanengine.errors import UserInputError
from wanengine.io.image import image_to_tensor, open_image
from wanengine.io.video import Video, atomic_path, check_output_path, to_uint8_frames


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    opened = open_image(path)
    assert opened.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    image = Image.new(mode, (16, 8))
    path = tmp_path / "img.png" if mode != "CMYK" else tmp_path / "img.jpg"
    image.save(path)
    opened = open_image(path)
    assert opened.mode == "RGB" and opened.size == (16, 8)


def test_image_tensor_range():
    tensor = image_to_tensor(Image.new("RGB", (4, 2), (0, 255, 51)))
    assert tensor.shape == (3, 2, 4)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


def test_bad_images_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        open_image(tmp_path / "missing.png")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(UserInputError, match="not a readable image"):
        open_image(bad)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(UserInputError):
        open_image(truncated)


def test_uint8_frames_truncate_like_the_reference():
    video = torch.tensor([-1.0, 0.0, 1.0, 0.999]).view(1, 4, 1, 1).expand(3, 4, 1, 1)
    frames = to_uint8_frames(video)
    assert frames.shape == (4, 1, 1, 3)
    assert frames[:, 0, 0, 0].tolist() == [0, 127, 255, 254]


def _video(frames: int = 5) -> Video:
    torch.manual_seed(0)
    return Video(tensor=torch.rand(3, frames, 32, 48) * 2 - 1, latent=torch.randn(16, 2, 4, 6), seed=7,
                 metadata={"settings": {"prompt": "p"}})


def test_save_mp4_and_safetensors(tmp_path):
    import imageio.v3 as iio
    from safetensors import safe_open

    video = _video()
    mp4 = video.save(tmp_path / "out.mp4")
    assert iio.imread(mp4).shape == (5, 32, 48, 3)
    st = video.save(tmp_path / "out.safetensors")
    with safe_open(str(st), "pt") as handle:
        assert torch.equal(handle.get_tensor("video"), video.tensor)
        assert torch.equal(handle.get_tensor("latent"), video.latent)
        assert handle.metadata()["seed"] == "7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "out.safetensors"]
    assert oct(os.stat(mp4).st_mode & 0o777) != oct(0o600)


def test_output_path_checks(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "x.mp4")
    with pytest.raises(UserInputError, match="unsupported extension"):
        check_output_path(tmp_path / "x.gif")
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(UserInputError, match="is a directory"):
        check_output_path(tmp_path / "d.mp4")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    video = _video()
    final = tmp_path / "out.mp4"

    def broken_writer(self, path, label):
        path.write_bytes(b"half a video")
        raise OSError("disk full")

    monkeypatch.setattr(Video, "_write_mp4", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        video.save(final)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing_and_keeps_an_existing_file(tmp_path):
    final = tmp_path / "out.safetensors"
    final.write_bytes(b"previous result")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert final.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
