"""core.atomic: a failed or killed write keeps the old file; only dead writers' temps are reaped;
the file lock makes a second process wait."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.atomic import atomic_write, file_lock, pid_alive, remove_dead_temps, temp_path
from core.errors import DataError


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.csv"
    atomic_write(target, lambda p: p.write_text("one"))
    atomic_write(target, lambda p: p.write_text("two"))
    assert target.read_text() == "two"
    assert sorted(target.parent.iterdir()) == [target]


def test_error_mid_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    target.write_text("old")

    def half(p: Path) -> None:
        p.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half)
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_kill_mid_write_keeps_old_file_and_next_write_reaps_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    target.write_text("old")
    script = textwrap.dedent(f"""
        import os, signal
        from core.atomic import atomic_write
        def dying(p):
            p.write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(target)!r}, dying)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p != target] == [f".a.csv.{proc.pid}.tmp"]
    atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and sorted(tmp_path.iterdir()) == [target]


def test_dead_temps_removed_live_and_foreign_kept(tmp_path: Path) -> None:
    dead = _dead_pid()
    assert not pid_alive(dead) and pid_alive(os.getpid())
    dead_file = tmp_path / f".x.csv.{dead}.tmp"
    dead_dir = tmp_path / f".images-1.{dead}.tmp"
    live = temp_path(tmp_path / "y.csv")
    other = tmp_path / ".notes.tmp"  # not a pid-named temp: someone else's file
    dead_file.write_text("half")
    dead_dir.mkdir()
    (dead_dir / "images.npy").write_bytes(b"half")
    live.write_text("being written")
    other.write_text("keep")
    assert sorted(remove_dead_temps(tmp_path)) == sorted([dead_file, dead_dir])
    assert sorted(tmp_path.iterdir()) == sorted([live, other])


def test_remove_dead_temps_only_for_the_named_target(tmp_path: Path) -> None:
    dead = _dead_pid()
    mine, theirs = tmp_path / f".a.csv.{dead}.tmp", tmp_path / f".b.csv.{dead}.tmp"
    mine.write_text("")
    theirs.write_text("")
    remove_dead_temps(tmp_path, "a.csv")
    assert sorted(tmp_path.iterdir()) == [theirs]


def test_zombie_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert not pid_alive(proc.pid)  # exited, not yet waited for: its temps are dead
    finally:
        proc.wait()


def _blocked_on(pid: int, path: Path) -> bool:
    """Whether the kernel lists ``pid`` as waiting for a lock on ``path`` (``/proc/locks``
    marks a blocked request ``->``: ``1: -> FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF``)."""
    inode = str(path.stat().st_ino)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:
            after = fields[fields.index("->") + 1:]
            if after[3] == str(pid) and after[4].rsplit(":", 1)[-1] == inode:
                return True
    return False


def test_file_lock_makes_second_process_wait(tmp_path: Path) -> None:
    lock, log = tmp_path / "x.lock", tmp_path / "log"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from core.atomic import file_lock
        with file_lock({str(lock)!r}):
            with open({str(log)!r}, "a") as f:
                f.write("child\\n")
    """)
    with file_lock(lock):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
        deadline = time.monotonic() + 60  # a hang guard, not a speed figure
        while not _blocked_on(proc.pid, lock):  # the event: the child waits in the kernel
            assert proc.poll() is None, "the child finished while the parent held the lock"
            assert time.monotonic() < deadline, "the child never reached the lock"
            time.sleep(0.01)
        assert not log.exists()
        log.write_text("parent\n")
    assert proc.wait(timeout=60) == 0
    assert log.read_text() == "parent\nchild\n"


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_the_old_one(tmp_path) -> None:
    target = tmp_path / "submission.csv"
    target.write_text("old\n")
    with pytest.raises(DataError, match=r"no space left on the device writing .*submission.csv "
                                        r"\(\d+ MiB free there\); nothing was left half-written"):
        atomic_write(target, _disk_full)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]  # no temp left
    atomic_write(target, lambda tmp: tmp.write_text("new\n"))  # with space again, it works
    assert target.read_text() == "new\n"


def test_a_full_disk_during_an_artifact_upload_or_checkpoint_is_the_same_line(tmp_path,
                                                                              monkeypatch):
    import numpy as np
    import optuna
    import torch

    from search import artifacts
    from search.objective import _atomic_torch_save

    store = artifacts.open_store(tmp_path / "store")
    trial = optuna.create_study().ask()
    monkeypatch.setattr("search.artifacts.shutil.copyfileobj", _disk_full)
    with pytest.raises(DataError, match="no space left on the device writing"):
        artifacts.save_array(trial, store, "oof", np.zeros(3))
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))
    monkeypatch.setattr("search.objective.torch.save", _disk_full)
    with pytest.raises(DataError, match=r"writing .*fold0.pt"):
        _atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "fold0.pt")
    assert not (tmp_path / "fold0.pt").exists()
