"""The parent of ``--workers N`` / ``--gpus``: one ``search.run`` process per GPU or CPU share."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence


def worker_envs(gpus: Sequence[str] | None, workers: int) -> list[dict[str, str]]:
    """Environment overrides per worker: one GPU each, or an equal share of the CPU cores."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": g} for g in gpus]
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    cpu = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return [dict(cpu) for _ in range(workers)]


def launch(argvs: Sequence[Sequence[str]], envs: Sequence[dict[str, str]]) -> list[int]:
    """Start ``python -m search.run ARGV`` per worker, wait for all; their exit codes.

    Workers run in their own sessions, so Ctrl-C reaches them once, through this parent:
    it forwards SIGINT (and SIGTERM, as SIGINT), then waits for them to mark their running
    trials FAIL and exit.
    """
    procs = [subprocess.Popen([sys.executable, "-m", "search.run", *argv],
                              env={**os.environ, **env}, start_new_session=True)
             for argv, env in zip(argvs, envs, strict=True)]

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)  # workers mark their trials FAIL and stop

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes: dict[int, int] = {}
        while len(codes) < len(procs):  # poll all, so a dead worker is reported (and reaped) now
            for i, p in enumerate(procs):
                if i in codes or (code := p.poll()) is None:
                    continue
                codes[i] = code
                if code < 0:
                    print(f"worker {i} (pid {p.pid}) was killed by signal {-code}",
                          file=sys.stderr, flush=True)
            time.sleep(0.2)
        return [codes[i] for i in range(len(procs))]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
