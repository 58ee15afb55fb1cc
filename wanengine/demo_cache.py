"""A directory built once into a shared cache, safely under concurrency and interrupts.

`cached_directory(target, build, verify)` returns `target` when it is complete (`verify`
passes); otherwise it takes an exclusive lock (`fcntl.flock` on `<target>.lock`, released by
the OS if the process dies), looks again (another process may have finished meanwhile),
removes stale staging directories (only a lock holder builds, so any found are leftovers of
a killed run), builds into a fresh `.<name>-staging-*` directory, fsyncs and verifies it, and
renames it into place. A complete `target` is never deleted, so a process reading it is never
pulled from under; an incomplete one is first renamed aside. The staging directory is
registered with `wanengine.interrupts`, so SIGTERM/SIGINT remove it too.

An unusable cache location is one `UserInputError` naming it and how to choose another.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

from . import interrupts
from .errors import UserInputError

STAGING_MARK = "-staging-"
CACHE_HINT = "choose another with --cache-dir or the WANENGINE_CACHE environment variable"


def check_cache_dir(cache_dir: Path) -> Path:
    """Create `cache_dir` if needed; UserInputError (exit 2) if it cannot be used."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserInputError(f"demo cache {cache_dir}: exists and is not a directory; {CACHE_HINT}") from None
    except OSError as exc:
        raise UserInputError(f"demo cache {cache_dir}: cannot be created ({exc.strerror}); {CACHE_HINT}") from None
    if not cache_dir.is_dir():
        raise UserInputError(f"demo cache {cache_dir}: not a directory; {CACHE_HINT}")
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise UserInputError(f"demo cache {cache_dir}: not writable; {CACHE_HINT}")
    return cache_dir


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed); without fcntl (Windows)
    the atomic rename alone keeps results whole."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        handle = open(path, "a+b")
    except OSError as exc:
        raise UserInputError(f"demo cache {path.parent}: cannot create a lock file ({exc.strerror}); "
                             f"{CACHE_HINT}") from None
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_complete(target: Path, verify: Callable[[Path], None]) -> bool:
    if not target.is_dir():
        return False
    try:
        verify(target)
    except Exception:
        return False
    return True


def _fsync_tree(root: Path) -> None:
    from .io.atomic import fsync_path

    for directory, _, names in os.walk(root):
        for name in names:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory), directory=True)


def remove_stale_staging(target: Path, legacy: Sequence[str] = ()) -> None:
    """Delete `.<target name>-staging-*` leftovers, and directories matching the `legacy`
    globs (an older version's staging names), with the lock held."""
    for pattern in (f".{target.name}{STAGING_MARK}*", *legacy):
        for leftover in target.parent.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


def cached_directory(target: Path, build: Callable[[Path], None], verify: Callable[[Path], None],
                     legacy_staging: Sequence[str] = ()) -> Path:
    """`target`, built by `build(staging_dir)` once if it is not complete (see the module doc);
    `legacy_staging`: globs of stale staging directories an older version left beside it."""
    if _is_complete(target, verify):
        return target
    check_cache_dir(target.parent)
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, verify):  # another process built it while we waited
            return target
        remove_stale_staging(target, legacy_staging)
        staging = target.parent / f".{target.name}{STAGING_MARK}{secrets.token_hex(4)}"
        interrupts.track_temp(staging, directory=True)
        try:
            staging.mkdir()
            build(staging)
            _fsync_tree(staging)
            verify(staging)
            if target.exists() or target.is_symlink():  # incomplete (checked above): move aside, then drop
                aside = target.parent / f".{target.name}{STAGING_MARK}old-{secrets.token_hex(4)}"
                os.replace(target, aside)
                shutil.rmtree(aside, ignore_errors=True)
            try:
                os.rename(staging, target)
            except OSError:  # lost a race on a platform without the lock: keep the winner's result
                if not _is_complete(target, verify):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            interrupts.untrack_temp(staging)
    return target
