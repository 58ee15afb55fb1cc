"""What is at a path, in words, for messages: "is a directory, not a regular file" instead of
a misleading "does not exist" when a checkpoint file is a directory, a FIFO or a device."""
from __future__ import annotations

import os
import stat
from typing import Optional, Union

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def file_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def not_a_file_reason(path: Union[str, "os.PathLike[str]"]) -> Optional[str]:
    """None for a regular file (through symlinks); else "file not found", "is a directory, not a
    regular file", "is a broken symlink", ..."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symlink" if os.path.islink(path) else "file not found"
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISREG(mode):
        return None
    return f"is {file_kind(mode)}, not a regular file"
