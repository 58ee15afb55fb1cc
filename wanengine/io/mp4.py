"""H.264 `.mp4` writing through the ffmpeg binary that imageio-ffmpeg ships, with every error
surfaced, and a container check that reads the frame count back from the file's header.

imageio's writer ignores ffmpeg's exit status, so a full disk used to give a truncated file
and exit 0. Here ffmpeg's status and its last error line are checked, a write to a dead
ffmpeg is reported with ffmpeg's reason, and `check_mp4` parses the written boxes (every
top-level box must end inside the file, `moov` must be there, and its video track's sample
count must be the number of frames sent) before `atomic_path` lets the file replace anything.
The settings (seed included) go into the container's `comment` tag as JSON.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from .atomic import OutputWriteError

CRF = 10  # imageio's quality=8 for libx264: int((1 - 8 / 10) * 51)


def _ffmpeg_command(path: Path, width: int, height: int, fps: int, comment: Optional[str]) -> list:
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s",
               f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264",
               "-pix_fmt", "yuv420p", "-crf", str(CRF), "-v", "error"]
    if comment is not None:
        command += ["-metadata", f"comment={comment}"]
    return command + ["-f", "mp4", str(path)]


def write_mp4(path: Path, frames: np.ndarray, fps: int, tags: Optional[Dict[str, object]] = None,
              label: Optional[Path] = None) -> None:
    """Encode uint8 `frames [F, H, W, 3]` to `path`; raises OutputWriteError naming `label`
    (default `path`) with ffmpeg's own reason on any failure. ffmpeg runs in its own session so a terminal
    Ctrl-C reaches only us; on any exception (an interrupt included) it is killed and reaped."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    count, height, width, _ = frames.shape
    comment = json.dumps(tags, default=str, sort_keys=True) if tags else None
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(_ffmpeg_command(path, width, height, fps, comment), stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        try:
            try:
                for frame in frames:
                    process.stdin.write(memoryview(frame).cast("B"))
                process.stdin.close()
            except BrokenPipeError:
                pass  # ffmpeg stopped reading: its exit status and message say why
            status = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        if status != 0:
            errors.seek(0)
            lines = [line.strip() for line in errors.read().decode("utf-8", "replace").splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {status}"
            raise OutputWriteError(f"{label or path}: ffmpeg could not write the video: {reason[:200]}; "
                                   "nothing was replaced")
    check_mp4(path, expected_frames=count, label=label)


def _boxes(data: bytes, start: int, end: int) -> Iterator[Tuple[bytes, int, int]]:
    """(type, payload start, box end) of the boxes in `data[start:end]`; raises on a box that
    runs past `end` (a truncated file)."""
    offset = start
    while offset < end:
        if end - offset < 8:
            raise ValueError(f"{end - offset} stray bytes at offset {offset}")
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[offset + 8:offset + 16])[0], 16
        elif size == 0:
            size = end - offset
        if size < header or offset + size > end:
            raise ValueError(f"box {kind!r} at offset {offset} runs past the end (truncated?)")
        yield kind, offset + header, offset + size
        offset += size


def _find(data: bytes, start: int, end: int, path: Tuple[bytes, ...]) -> Iterator[Tuple[int, int]]:
    for kind, payload, box_end in _boxes(data, start, end):
        if kind != path[0]:
            continue
        if len(path) == 1:
            yield payload, box_end
        else:
            inner = payload + 4 if kind == b"meta" else payload  # meta is a full box
            yield from _find(data, inner, box_end, path[1:])


def _moov(path: Path) -> Tuple[bytes, int, int]:
    """The file's bytes around `moov`: reads the top-level box headers, then `moov` only."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        offset, moov = 0, None
        while offset < size:
            handle.seek(offset)
            head = handle.read(16)
            if len(head) < 8:
                raise ValueError(f"{size - offset} stray bytes at offset {offset}")
            box_size, kind = struct.unpack(">I4s", head[:8])
            if box_size == 1:
                box_size = struct.unpack(">Q", head[8:16])[0]
            elif box_size == 0:
                box_size = size - offset
            if box_size < 8 or offset + box_size > size:
                raise ValueError(f"box {kind!r} at offset {offset} runs past the end of the file (truncated?)")
            if kind == b"moov":
                handle.seek(offset)
                moov = handle.read(box_size)
            offset += box_size
    if moov is None:
        raise ValueError("no moov box (the index ffmpeg writes last is missing)")
    return moov, 0, len(moov)


def read_mp4_header(path: Path) -> Tuple[int, Optional[str]]:
    """(video frames from the track's sample table, the `comment` tag or None)."""
    moov, start, end = _moov(Path(path))
    (payload, box_end), = [(p, e) for p, e in _find(moov, start, end, (b"moov",))]
    frames = None
    for trak, trak_end in _find(moov, payload, box_end, (b"trak",)):
        handlers = [moov[p + 8:p + 12] for p, _ in _find(moov, trak, trak_end, (b"mdia", b"hdlr"))]
        if b"vide" not in handlers:
            continue
        for stsz, _ in _find(moov, trak, trak_end, (b"mdia", b"minf", b"stbl", b"stsz")):
            frames = struct.unpack(">I", moov[stsz + 8:stsz + 12])[0]
    if frames is None:
        raise ValueError("no video track with a sample table")
    comment = None
    for item, item_end in _find(moov, payload, box_end, (b"udta", b"meta", b"ilst", b"\xa9cmt", b"data")):
        comment = moov[item + 8:item_end].decode("utf-8", "replace")
    return frames, comment


def check_mp4(path: Path, expected_frames: int, label: Optional[Path] = None) -> None:
    """Raise OutputWriteError (naming `label`, default `path`) unless `path` is a complete mp4
    holding `expected_frames` frames."""
    try:
        frames, _ = read_mp4_header(path)
    except (OSError, ValueError, struct.error) as exc:
        raise OutputWriteError(f"{label or path}: the written video is incomplete ({exc}); "
                               "nothing was replaced") from None
    if frames != expected_frames:
        raise OutputWriteError(f"{label or path}: the written video holds {frames} of {expected_frames} frames; "
                               "nothing was replaced")
