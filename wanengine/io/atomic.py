"""Writing a file so that it cannot lie: a temporary file beside the destination, flushed and
fsynced, checked, and only then renamed over the destination (whose directory is fsynced).

So a full disk, a writer error, an exception or a signal never leaves a half-written file at
the final path, and never replaces an existing file with an incomplete one. The temporary
file is registered with `wanengine.interrupts`, which removes it even on a second Ctrl-C.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from .. import interrupts
from ..errors import WanEngineError

PathLike = Union[str, "os.PathLike[str]"]
TEMP_MARK = ".partial"


class OutputWriteError(WanEngineError, OSError):
    """Writing an output failed (full disk, writer error, a result that does not read back);
    the destination was left as it was. A runtime failure (exit 1), naming the file; also an
    OSError, so `except OSError` around a save keeps working."""


def name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def temp_name(final: Path) -> str:
    """`.STEM.RANDOM.partialSUFFIX`, with STEM shortened (in bytes, as the file system counts)
    so that the name fits NAME_MAX whenever the final name does."""
    token = secrets.token_hex(4)
    fixed = f"..{token}{TEMP_MARK}{final.suffix}"
    budget = name_max(final.parent if str(final.parent) else Path(".")) - len(os.fsencode(fixed))
    stem = os.fsencode(final.stem)[: max(budget, 0)].decode("utf-8", "ignore")  # never half a character
    return f".{stem}.{token}{TEMP_MARK}{final.suffix}"


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush `path` (a file, or a directory's entries) to stable storage."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some file systems do not open directories; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _create_temp(final: Path) -> Path:
    directory = final.parent if str(final.parent) else Path(".")
    for _ in range(100):
        tmp = directory / temp_name(final)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise OutputWriteError(f"{final}: could not create a temporary file in {directory}")  # pragma: no cover


@contextlib.contextmanager
def atomic_path(path: PathLike, verify: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same extension). When the block ends normally the
    file is fsynced, must be non-empty and pass `verify(tmp)` (which raises if the content is
    wrong), and is renamed onto `path`; on any error or interrupt it is deleted and `path` is
    untouched. OS errors (ENOSPC, EIO, ...) become one `OutputWriteError` naming `path`."""
    final = Path(path)
    tmp = _create_temp(final)
    interrupts.track_temp(tmp)
    try:
        try:
            yield tmp
            fsync_path(tmp)
            if tmp.stat().st_size == 0:
                raise OutputWriteError(f"{final}: the writer produced an empty file (disk full?); nothing was replaced")
            if verify is not None:
                verify(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # the temporary file is 0600; give the result normal permissions
            os.replace(tmp, final)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OutputWriteError(f"{final}: could not be written: {reason}; nothing was replaced") from exc
        fsync_path(final.parent if str(final.parent) else Path("."), directory=True)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        interrupts.untrack_temp(tmp)


def write_text_atomically(path: PathLike, text: str, verify: Optional[Callable[[Path], None]] = None) -> Path:
    """`text` (UTF-8) to `path` through `atomic_path`; the bytes are read back and compared."""
    data = text.encode("utf-8")

    def check(tmp: Path) -> None:
        if tmp.read_bytes() != data:
            raise OutputWriteError(f"{path}: the file read back differs from what was written; nothing was replaced")
        if verify is not None:
            verify(tmp)

    with atomic_path(path, verify=check) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
    return Path(path)
