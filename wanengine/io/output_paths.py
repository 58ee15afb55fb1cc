"""What a run may write to: checked in the preflight, before anything is loaded.

An output path (`--out`, `--metrics-json`) must be a new file or an existing *regular* file
in an existing, writable directory -- never a device, FIFO, socket or directory, and a
symlink only when it points at such a file in the same directory (the target is then what
gets replaced). Its name must fit NAME_MAX. The outputs of one run must differ from each
other, from the input image and from every file the run reads, and must not lie inside the
checkpoint directory. Every violation is one `UserInputError` naming the flag (exit 2).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

from ..errors import UserInputError
from .file_kinds import file_kind

PathLike = Union[str, "os.PathLike[str]"]

def check_output_file(path: PathLike, flag: str, extensions: Optional[Sequence[str]] = None) -> Path:
    """The path to write for `flag` (a symlink resolved to its target), or a UserInputError."""
    out = Path(path)
    if extensions is not None and out.suffix.lower() not in extensions:
        raise UserInputError(f"{flag}: {out}: unsupported extension {out.suffix or '(none)'!r}; "
                             f"use {' or '.join(extensions)}")
    parent = out.parent if str(out.parent) else Path(".")
    if not out.name:
        raise UserInputError(f"{flag}: {out}: not a file name")
    if not parent.is_dir():
        raise UserInputError(f"{flag}: {out}: directory {parent} does not exist")
    from .atomic import name_max

    limit = name_max(parent)
    if len(os.fsencode(out.name)) > limit:
        raise UserInputError(f"{flag}: {out}: the file name is longer than {limit} bytes")
    if os.path.islink(out):
        target = Path(os.path.realpath(out))
        if target.parent != Path(os.path.realpath(parent)):
            raise UserInputError(f"{flag}: {out} is a symlink to {target}, outside the output directory {parent}; "
                                 "give the target itself or remove the link")
        out, parent = target, target.parent
    try:
        info = os.stat(out)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise UserInputError(f"{flag}: {out}: {exc.strerror}") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise UserInputError(f"{flag}: {out} is {file_kind(info.st_mode)}, not a regular file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag}: {out}: directory {parent} is not writable")
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
    """`outputs` (flag -> path) must differ from each other, from `image`, from every file of
    `ckpt_dir` and of `reads` (component files or directories given on their own), and must not
    lie inside `ckpt_dir`."""
    items = list(outputs.items())
    for index, (flag, path) in enumerate(items):
        for other_flag, other in items[index + 1:]:
            if _same_file(path, other):
                raise UserInputError(f"{other_flag}: {other} is the same file as {flag}; give them different paths")
        if image is not None and not hasattr(image, "mode") and _same_file(path, Path(image)):
            raise UserInputError(f"{flag}: {path} is the input image (--image); writing it would destroy the input")
    if ckpt_dir is not None:
        root = _identity(Path(ckpt_dir))
        for flag, path in items:
            where = _identity(path)
            if where == root or where.startswith(root.rstrip(os.sep) + os.sep):
                raise UserInputError(f"{flag}: {path} is inside the checkpoint directory {ckpt_dir} (--ckpt-dir); "
                                     "write outputs elsewhere")
    read = set()
    for source in ([ckpt_dir] if ckpt_dir is not None else []) + list(reads):
        source = Path(source)
        read |= {_identity(p) for p in (files_read_from(source) if source.is_dir() else [source])}
    for flag, path in items:
        if _identity(path) in read:
            raise UserInputError(f"{flag}: {path} is a file the run reads (the checkpoint's); write outputs elsewhere")
