"""Atomic, fsynced writes: every layer that writes a file or a directory goes through here.

A directory is written into a hidden temporary sibling (`.NAME.tmp-<pid>-<random>`), flushed, and swapped
into place (Linux `renameat2(RENAME_EXCHANGE)`, else two renames with the old one restored on failure).
A file is written to `.NAME.tmp-<pid>-<random>`, flushed and renamed over the target. Either way a failure
(a full disk included) leaves the previous target exactly as it was, and no partial output.

A write killed before it could clean up (SIGKILL, power loss) leaves its temporary sibling behind; the next
write to the same target removes every such sibling whose writing process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

_TMP = ".tmp-"
_OLD = ".old-"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # old kernel or a filesystem without exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so a rename never publishes data still in flight."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _owner_pid(sibling: str, target_name: str) -> int | None:
    """The writer's pid in `.NAME.tmp-<pid>-...` / `.NAME.old-<pid>-...`; None for any other name."""
    for marker in (_TMP, _OLD):
        prefix = f".{target_name}{marker}"
        if sibling.startswith(prefix):
            pid = sibling[len(prefix):].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def remove_stale_siblings(target: Path) -> list[Path]:
    """Delete the temporary siblings of `target` left by writes whose process no longer runs; returns them.

    Siblings of a live writer (another process writing the same target right now, or this one) are kept.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        pid = _owner_pid(entry.name, target.name)
        if pid is None or pid == os.getpid() or _pid_alive(pid):
            continue  # not ours to judge, or a write still in progress (this process's included)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _sibling_prefix(target: Path, marker: str) -> str:
    return f".{target.name}{marker}{os.getpid()}-"


def _replace_directory(tmp: Path, target: Path) -> None:
    """Move a fully written tmp dir onto target. With RENAME_EXCHANGE the target path always holds either
    the old or the new directory; otherwise there is a window of two renames, and the old one is restored if
    the second fails."""
    if target.exists() and target.is_dir() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous output
        return
    backup = None
    if target.exists():
        backup = target.with_name(_sibling_prefix(target, _OLD) + uuid.uuid4().hex[:8])
        os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target` to write into; when the block succeeds it is flushed
    to disk and swapped in for `target`; when it fails (a full disk included) it is deleted and `target`,
    if it existed, is left exactly as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(target, _TMP), dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _replace_directory(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    fd, tmp = tempfile.mkstemp(prefix=_sibling_prefix(path, _TMP), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def append_record(path, key: str, record) -> None:
    """Append one `{"id": key, "row": record}` JSON line to a journal of finished work (flushed and fsynced, so a
    killed run keeps every line it wrote whole; `read_records` ignores a line cut off mid-write)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"id": key, "row": record}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path) -> dict:
    """{id: row} of a journal `append_record` wrote ({} when there is none); a cut-off last line is ignored."""
    import json

    path, out = Path(path), {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[record["id"]] = record["row"]
    return out
