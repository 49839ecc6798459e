"""All-or-nothing file writes, the reaping of temps that killed writers left, and file locks.

Why one module: caches, face-box tables, artifacts, submissions and checkpoints are all
written as "temp next to the target, fsync, rename", so a reader sees the old file or the new
one, never half of one. One temp naming rule (``.<name>.<pid>.tmp``, in the target's folder so
the rename never crosses file systems) lets any later writer tell a temp whose process is gone
(a SIGKILL runs no cleanup) from one still being written, and delete only the former.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from core.errors import DataError


def temp_path(path: str | Path) -> Path:
    """``.<name>.<pid>.tmp`` next to ``path``: one writer per target per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie (killed, not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    fields = proc_stat(pid)
    if fields is None:  # no /proc (not Linux) or it just exited: trust os.kill
        return True
    return fields[0] not in ("Z", "X")


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first; Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields or None


def _temp_pid(temp: Path) -> int | None:
    """The writer's pid in ``.<name>.<pid>.tmp``, or None when the name does not follow it."""
    try:
        return int(temp.name.rsplit(".", 2)[1])
    except (IndexError, ValueError):
        return None


def remove_dead_temps(folder: str | Path, name: str = "*") -> list[Path]:
    """Delete the ``.<name>.<pid>.tmp`` files or folders in ``folder`` whose process is gone.

    ``name`` is a glob (``*``: every target in the folder). Temps of live processes are kept:
    they are being written. Returns what was removed.
    """
    removed = []
    for temp in Path(folder).glob(f".{name}.*.tmp"):
        pid = _temp_pid(temp)
        if pid is None or pid_alive(pid):
            continue
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        removed.append(temp)
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ENOSPC


def disk_full(path: Path) -> DataError:
    """The one line for a full disk: what was being written, and the space left there."""
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return DataError(f"no space left on the device writing {path} "
                     f"({shutil.disk_usage(folder).free / 2**20:.0f} MiB free there); "
                     "nothing was left half-written: free some space and rerun")


def reserve_space(path: Path) -> None:
    """Allocate a (sparse, memory-mapped) file's whole size now. On a disk that fills up, a
    sparse file fails later with SIGBUS in the middle of a write (no message, no cleanup);
    reserved, a full disk is an ENOSPC here. File systems that cannot reserve keep it sparse."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp)`` to write the whole file at a temp path, fsync it, rename it to ``path``.

    A crash, an exception or a kill mid-write leaves ``path`` as it was (the exception also
    removes the temp; a kill leaves it, and the next write of ``path`` removes it). A full disk
    is a ``DataError`` naming the path: one line from every CLI, and it stops a search at once
    (every later trial would hit it too). ``write``
    gets a path, not a handle, so ``torch.save``, ``DataFrame.to_csv`` and ``Figure.savefig``
    (pass ``format=``: the temp ends in ``.tmp``) all fit.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path.parent, _glob_escape(path.name))
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):  # the user's to fix: one line
            raise disk_full(path) from e
        raise
    _fsync_dir(path.parent)
    return path


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, never deleted) for the ``with`` block.

    Processes on one machine (and on NFS/Lustre that support flock) wait for each other; the
    kernel releases the lock when its holder dies, so a killed holder never blocks the rest.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def build_folder_once(out: str | Path, build: Callable[[Path], None],
                      marker: str = "train/train.csv") -> Path:
    """``out``, built by ``build(tmp)`` in a temporary folder beside it and renamed into place
    the first time (``out/marker`` says it is complete); reused after that.

    An interrupted first build leaves no half folder behind; when another process renamed its
    identical build into place first, ours is dropped.
    """
    out = Path(out)
    if (out / marker).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process built it first: theirs is identical
            if not (out / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
