"""The result of a generation (`Video`) and writing it: H.264 mp4 or safetensors, atomically.

Files are first written to a temporary file in the destination directory, fsynced, read back
(the mp4's frame count from its header, the safetensors header and size) and renamed into
place only when complete (`io.atomic`), so a full disk, an error or a signal never leaves a
half-written file at the final path or replaces an existing one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .atomic import OutputWriteError, atomic_path  # noqa: F401 (atomic_path is re-exported)
from .output_paths import VIDEO_EXTENSIONS as SUPPORTED_EXTENSIONS

if TYPE_CHECKING:
    from PIL import Image



def check_output_path(path: Union[str, "os.PathLike[str]"], argument: str = "path") -> Path:
    """Fail before any compute if `path` cannot be written (see `io.output_paths`); the error
    names `argument` (`Video.save`'s `path`, the CLI's `--out`)."""
    from .output_paths import check_output_file

    return check_output_file(path, argument, extensions=SUPPORTED_EXTENSIONS)


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
                self._write_mp4(tmp, out)
            else:
                self._write_safetensors(tmp, out)
        from .. import interrupts

        interrupts.note_written(out)
        return out

    def mp4_tags(self) -> Dict[str, Any]:
        """What the mp4's `comment` tag records: the seed and the generation settings."""
        return {"seed": self.seed, "fps": self.fps, "settings": self.metadata.get("settings", {}),
                "wanengine": self.metadata.get("versions", {}).get("wanengine")}

    def _write_mp4(self, path: Path, label: Path) -> None:
        from .mp4 import write_mp4

        write_mp4(path, self.frames, self.fps, tags=self.mp4_tags(), label=label)

    def _write_safetensors(self, path: Path, label: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        meta = {"seed": str(self.seed), "fps": str(self.fps)}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()})
        tensors = {"video": self.tensor.detach().float().cpu().contiguous(),
                   "latent": self.latent.detach().float().cpu().contiguous()}
        try:
            save_file(tensors, str(path), metadata=meta)
        except Exception as exc:  # SafetensorError (not an OSError) for ENOSPC, EIO, ...
            reason = " ".join(str(exc).split())[:200]
            raise OutputWriteError(f"{label}: could not be written: {reason}; nothing was replaced") from None
        try:  # read the header back: every tensor with its shape, and data covering the file
            with safe_open(str(path), framework="pt") as handle:
                shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except Exception as exc:
            raise OutputWriteError(f"{label}: the written file does not read back ({exc}); nothing was replaced") from None
        if shapes != {name: list(t.shape) for name, t in tensors.items()}:
            raise OutputWriteError(f"{label}: the written file does not hold the video and latent; nothing was replaced")
