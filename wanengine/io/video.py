"""The result of a generation (`Video`) and writing it: H.264 mp4 or safetensors, atomically.

Files are first written to a temporary file in the destination directory and renamed into
place only when complete, so an error or Ctrl-C never leaves a half-written file at the
final path.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import UserInputError

if TYPE_CHECKING:
    from PIL import Image

SUPPORTED_EXTENSIONS = (".mp4", ".safetensors")


def check_output_path(path: Union[str, "os.PathLike[str]"]) -> Path:
    """Fail before any compute if `path` cannot be written: unsupported extension, missing or
    read-only directory, or an existing directory at that name."""
    out = Path(path)
    if out.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise UserInputError(f"--out: {out}: unsupported extension {out.suffix or '(none)'!r}; use .mp4 or .safetensors")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserInputError(f"--out: {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserInputError(f"--out: {out}: directory {parent} is not writable")
    if out.is_dir():
        raise UserInputError(f"--out: {out} is a directory")
    return out


@contextlib.contextmanager
def atomic_path(path: Union[str, "os.PathLike[str]"]) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same extension); rename it onto `path` on success,
    delete it on any error or interrupt."""
    final = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".partial{final.suffix}", dir=final.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file normal permissions
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """`[3, F, H, W]` in [-1, 1] -> uint8 `[F, H, W, 3]` by truncation, as the reference writes."""
    scaled = (video.float().clamp(-1, 1) + 1) / 2 * 255
    return scaled.to(torch.uint8).permute(1, 2, 3, 0).contiguous()


@dataclass
class Video:
    """A generated clip. `tensor`: float32 `[3, F, H, W]` in [-1, 1]; `latent`: the final
    latent `[16, F', H/8, W/8]`; `fps`, `seed`; `metadata`: settings, timings, versions.
    `frames` is the uint8 numpy `[F, H, W, 3]` the files are written from; `to_pil()` the
    frames as PIL images."""

    tensor: torch.Tensor
    latent: torch.Tensor
    fps: int = 16
    seed: int = 0
    metadata: Dict[str, Any] = field(default_factory=dict)
    _frames: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def frames(self) -> np.ndarray:
        """uint8 numpy `[F, H, W, 3]` (truncated as the reference writes; computed once)."""
        if self._frames is None:
            self._frames = to_uint8_frames(self.tensor.cpu()).numpy()
        return self._frames

    def to_pil(self) -> List["Image.Image"]:
        """The frames as RGB PIL images."""
        from PIL import Image

        return [Image.fromarray(frame) for frame in self.frames]

    @property
    def num_frames(self) -> int:
        return int(self.tensor.shape[1])

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height) of a frame."""
        return int(self.tensor.shape[3]), int(self.tensor.shape[2])

    def __repr__(self) -> str:  # the dataclass default would print every pixel
        width, height = self.size
        seconds = self.num_frames / self.fps if self.fps else 0.0
        return f"Video({self.num_frames} frames of {width}x{height} at {self.fps} fps ({seconds:.2f} s), seed {self.seed})"

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Write `.mp4` (H.264 via imageio-ffmpeg) or `.safetensors` (keys `video`, `latent`,
        with the metadata as JSON strings) atomically; raises on any failure."""
        out = check_output_path(path)
        with atomic_path(out) as tmp:
            if out.suffix.lower() == ".mp4":
                self._write_mp4(tmp)
            else:
                self._write_safetensors(tmp)
        return out

    def _write_mp4(self, path: Path) -> None:
        import imageio.v2 as imageio

        frames = self.frames
        writer = imageio.get_writer(str(path), fps=self.fps, codec="libx264", quality=8, format="FFMPEG",
                                    macro_block_size=1, ffmpeg_log_level="error")
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()

    def _write_safetensors(self, path: Path) -> None:
        from safetensors.torch import save_file

        meta = {"seed": str(self.seed), "fps": str(self.fps)}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()})
        save_file({"video": self.tensor.detach().float().cpu().contiguous(),
                   "latent": self.latent.detach().float().cpu().contiguous()}, str(path), metadata=meta)
