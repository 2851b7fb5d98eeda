"""Filesystem helpers: atomic file and directory outputs, fsync.

`write_bytes_atomic` / `write_text_atomic` / `write_json_atomic` write a file through a temp name
unique to the process and thread, fsync it, rename it into place and fsync the directory: a
reader sees the old file or the new one, never half of one. Use them for every file finrecipe
writes that something else reads back.

`atomic_dir(dest)` yields a temporary directory beside `dest` named
`.<dest-name>.finrecipe-tmp-<pid>-<rand>`; on success it is fsynced and renamed to `dest`; on
any exception (Ctrl-C included) it is removed. A temp dir left by a killed process (SIGKILL,
power loss) is removed by the next `atomic_dir` for the same destination once its pid is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finrecipe.errors import FinrecipeError, IoError

TMP_MARK = ".finrecipe-tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory (children before parents)."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for f in files:
            fp = os.path.join(root, f)
            if os.path.islink(fp):
                continue
            fd = os.open(fp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a unique temp file + fsync + rename + directory fsync."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IoError(f"{path.parent}: cannot create directory: {e.strerror}") from None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(3)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise IoError(f"{path}: cannot write: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """JSON (strict: NaN and infinities are refused, they are not JSON) written atomically."""
    try:
        text = json.dumps(obj, indent=indent, sort_keys=False, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise IoError(f"{path}: cannot write a non-finite number as JSON ({e})") from None
    write_text_atomic(path, text + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(dest: Path) -> list[Path]:
    """Remove temp dirs for `dest` whose creating process is gone. Returns what was removed."""
    removed: list[Path] = []
    parent = dest.parent
    if not parent.is_dir():
        return removed
    prefix = f".{dest.name}{TMP_MARK}"
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def sweep_stale_temps(root: Path, *, max_depth: int = 4) -> list[Path]:
    """Remove, under `root`, the temporary files and directories of finrecipe writes
    (`.NAME.finrecipe-tmp-PID-...`, `.NAME.tmp-PID-...`) whose process is gone: what a killed merge,
    training or report write left behind. Links are not followed."""
    import re

    pat = re.compile(r"^\..+?(?:\.finrecipe-tmp-|\.tmp-)(\d+)-")
    removed: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        for name in [*dirnames, *filenames]:
            m = pat.match(name)
            if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
            p = Path(dirpath) / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
        dirnames[:] = [d for d in dirnames if depth < max_depth and (Path(dirpath) / d) not in removed
                       and not (Path(dirpath) / d).is_symlink()]
    return removed


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temp dir; it becomes `dest` on success."""
    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise FinrecipeError(f"{dest} already exists; pass --overwrite to replace it")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IoError(f"{dest.parent}: cannot create directory: {e.strerror}") from None
    clean_stale_temps(dest)
    tmp = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}-old-{secrets.token_hex(4)}"
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
