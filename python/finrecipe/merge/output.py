"""Where a merge writes: a hidden temporary directory beside the destination, renamed into place
only when complete, onto a path that must not exist.

- The destination is checked at the start (a clear error before any work) and again by the final
  rename itself: `finrecipe._core.rename_noreplace` (Linux `renameat2(RENAME_NOREPLACE)`) fails
  if the destination appeared meanwhile, so of two merges into one directory without
  `overwrite` exactly one wins and the other gets a one-line error (exit code 1); nothing is
  replaced.
- The temporary directory `.<name>.finrecipe-tmp-merge-<pid>-<hex>` is locked (`flock`) by its
  process for its whole life. A merge killed with SIGKILL or by a power loss leaves it behind;
  the next merge to the same destination finds it unlocked and removes it (`clean_stale`). The
  lock (rather than the pid) makes this safe when pids are reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from finrecipe.errors import FinrecipeError, IoError
from finrecipe.util.fs import clean_stale_temps, fsync_dir, fsync_tree

TMP_MARK = ".finrecipe-tmp-merge-"


class DestinationExists(FinrecipeError):
    """The output directory exists (or was created by another process while this one worked)."""


def _tmp_prefix(dest: Path) -> str:
    return f".{dest.name}{TMP_MARK}"


def _unlocked(p: Path) -> bool:
    """True when no process holds the lock of temp dir `p` (its owner is gone)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the lock we may have taken
    return True


def clean_stale(dest: str | Path) -> list[Path]:
    """Remove the temporary directories of killed merges into `dest`. Returns what was removed."""
    dest = Path(dest).absolute()
    removed = clean_stale_temps(dest)
    parent = dest.parent
    if not parent.is_dir():
        return removed
    prefix = _tmp_prefix(dest)
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if p.name.startswith(prefix) and not p.is_symlink() and p.is_dir() and _unlocked(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _exists_error(dest: Path, during: bool) -> DestinationExists:
    if during:
        return DestinationExists(f"{dest} was created by another process while this merge ran; it was "
                                 "left as it is and this merge's output discarded; use another directory "
                                 "or pass --overwrite to replace it")
    return DestinationExists(f"{dest} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Fill the yielded temporary directory; on success it becomes `dest` (see the module docs)."""
    from finrecipe import _core

    dest = Path(dest).absolute()
    if not overwrite and (dest.exists() or dest.is_symlink()):
        raise _exists_error(dest, during=False)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IoError(f"{dest.parent}: cannot create the output's parent directory: {e.strerror or e}") from None
    clean_stale(dest)
    tmp = dest.parent / f"{_tmp_prefix(dest)}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise IoError(f"{dest.parent}: cannot write the output here: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield tmp
        try:
            fsync_tree(tmp)
            old: Path | None = None
            if overwrite and (dest.exists() or dest.is_symlink()):
                old = dest.parent / f"{_tmp_prefix(dest)}{os.getpid()}-old-{secrets.token_hex(4)}"
                os.rename(dest, old)
            try:
                _core.rename_noreplace(str(tmp), str(dest))
            except FileExistsError:
                raise _exists_error(dest, during=True) from None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            fsync_dir(dest.parent)
        except OSError as e:
            raise IoError(f"{dest}: cannot move the finished output into place: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
