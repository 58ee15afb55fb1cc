"""What a run may write to: checked in the preflight, before anything is loaded.

An output path (`--out`, `--metrics-json`) must be a new file or an existing *regular* file
in an existing, writable directory -- never a device, FIFO, socket or directory, and a
symlink only when it points at such a file in the same directory (the target is then what
gets replaced). Its name must fit NAME_MAX. The outputs of one run must differ from each
other, from the input image and from every file the run reads, and must not lie inside the
checkpoint directory. Every violation is one `InvalidArgument` naming the argument (the CLI
prints its flag; exit 2).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

from ..errors import InvalidArgument
from .file_kinds import file_kind

PathLike = Union[str, "os.PathLike[str]"]
VIDEO_EXTENSIONS = (".mp4", ".safetensors")  # what `Video.save` writes

def check_output_file(path: PathLike, argument: str, extensions: Optional[Sequence[str]] = None) -> Path:
    """The path to write for `argument` (a symlink resolved to its target), or an
    `InvalidArgument` naming it."""
    out = Path(path)
    if extensions is not None and out.suffix.lower() not in extensions:
        raise InvalidArgument(argument, f"{out}: unsupported extension {out.suffix or '(none)'!r}; "
                             f"use {' or '.join(extensions)}")
    parent = out.parent if str(out.parent) else Path(".")
    if not out.name:
        raise InvalidArgument(argument, f"{out}: not a file name")
    if not parent.is_dir():
        raise InvalidArgument(argument, f"{out}: directory {parent} does not exist")
    from .atomic import name_max

    limit = name_max(parent)
    if len(os.fsencode(out.name)) > limit:
        raise InvalidArgument(argument, f"{out}: the file name is longer than {limit} bytes")
    if os.path.islink(out):
        target = Path(os.path.realpath(out))
        if target.parent != Path(os.path.realpath(parent)):
            raise InvalidArgument(argument, f"{out} is a symlink to {target}, outside the output directory {parent}; "
                                 "give the target itself or remove the link")
        out, parent = target, target.parent
    try:
        info = os.stat(out)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise InvalidArgument(argument, f"{out}: {exc.strerror}") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(argument, f"{out} is {file_kind(info.st_mode)}, not a regular file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgument(argument, f"{out}: directory {parent} is not writable")
    return out


def _identity(path: Path) -> str:
    return os.path.realpath(path)


def _same_file(a: Path, b: Path) -> bool:
    if _identity(a) == _identity(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def files_read_from(ckpt_dir: PathLike) -> Iterable[Path]:
    """Every file under the checkpoint directory (through symlinks), cheaply: a released
    checkpoint has a few dozen files."""
    for root, _, names in os.walk(ckpt_dir, followlinks=True):
        for name in names:
            yield Path(root) / name


def check_run_outputs(outputs: Dict[str, Path], image: Optional[PathLike] = None,
                      ckpt_dir: Optional[PathLike] = None, reads: Sequence[PathLike] = ()) -> None:
    """`outputs` (argument -> path) must differ from each other, from `image`, from every file
    of `ckpt_dir` and of `reads` (component files or directories given on their own), and must
    not lie inside `ckpt_dir`."""
    items = list(outputs.items())
    for index, (argument, path) in enumerate(items):
        for other_argument, other in items[index + 1:]:
            if _same_file(path, other):
                raise InvalidArgument.for_argument(other_argument, lambda words: (
                    f"{other} is the same file as {words.name(argument)}; give them different paths"))
        if image is not None and not hasattr(image, "mode") and _same_file(path, Path(image)):
            raise InvalidArgument.for_argument(argument, lambda words: (
                f"{path} is the input image ({words.name('image')}); writing it would destroy the input"))
    if ckpt_dir is not None:
        root = _identity(Path(ckpt_dir))
        for argument, path in items:
            where = _identity(path)
            if where == root or where.startswith(root.rstrip(os.sep) + os.sep):
                raise InvalidArgument.for_argument(argument, lambda words: (
                    f"{path} is inside the checkpoint directory {ckpt_dir} ({words.name('ckpt_dir')}); "
                    "write outputs elsewhere"))
    read = set()
    for source in ([ckpt_dir] if ckpt_dir is not None else []) + list(reads):
        source = Path(source)
        read |= {_identity(p) for p in (files_read_from(source) if source.is_dir() else [source])}
    for argument, path in items:
        if _identity(path) in read:
            raise InvalidArgument(argument, f"{path} is a file the run reads (the checkpoint's); write outputs elsewhere")
