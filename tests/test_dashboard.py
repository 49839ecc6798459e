"""``python -m search.dashboard`` serves the study and its artifacts (HTTP API and a real browser).

The study here is made directly through Optuna and ``search.artifacts`` (no training): what is
tested is that our command wires the storage and the artifact store into optuna-dashboard.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest

from search import artifacts

ROOT = Path(__file__).resolve().parents[1]
STUDY = "dash_study"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dash")
    url, art = f"sqlite:///{root / 'dash.db'}", root / "artifacts"
    study = optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    store = artifacts.open_store(art)
    trial = study.ask()
    oof = np.random.default_rng(0).random((5, 18)).astype(np.float32)
    artifacts.save_array(trial, store, "oof", oof)
    study.tell(trial, 0.5)
    old = study.ask()  # a trial whose checkpoint retention has since removed
    checkpoint = root / "fold0.pt"
    checkpoint.write_bytes(b"weights")
    artifacts.save_file(old, store, "checkpoint_fold0", checkpoint)
    study.tell(old, 0.1)
    assert artifacts.remove_artifact(study.trials[1], store, "checkpoint_fold0")
    with dashboard_at(url, art) as base:
        yield base, oof, root


@contextlib.contextmanager
def dashboard_at(url: str, art: Path):
    """``search.dashboard`` on a free port for ``url``'s study; yields its base URL."""
    port = free_port()
    with subprocess.Popen(  # `with` closes the pipe: no ResourceWarning
        [sys.executable, "-m", "search.dashboard", "--study", study_name(url), "--storage", url,
         "--artifacts", str(art), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    get(base + "/api/meta")
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        pytest.fail(f"dashboard did not start: {proc.communicate()[0][-2000:]}")
                    time.sleep(0.3)
            yield base
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.communicate(timeout=20)


def study_name(url: str) -> str:
    """The one study in ``url``."""
    (summary,) = optuna.get_all_study_summaries(url)
    return summary.study_name


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is needed for this test (tools/test installs it)"
    return found


@pytest.mark.slow
@pytest.mark.browser
def test_a_real_browser_renders_the_study_name(server, tmp_path: Path) -> None:
    base, _, _ = server
    r = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=8000", "--dump-dom", f"{base}/dashboard"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert STUDY in r.stdout


def listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port``, from /proc/net/tcp{,6} (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def test_server_listens_on_loopback_only(server) -> None:
    """No --host: the socket is bound to 127.0.0.1 (0100007F), not 0.0.0.0 or ::, so other
    machines cannot reach a dashboard that can edit studies and has no login."""
    base, _, _ = server
    port = int(base.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"0100007F"}


def test_host_flag_reaches_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna_dashboard

    from search import dashboard

    url = f"sqlite:///{tmp_path / 'x.db'}"
    optuna.create_study(study_name=STUDY, storage=url)
    seen = []
    monkeypatch.setattr(optuna_dashboard, "run_server",
                        lambda storage, host, port, artifact_store: seen.append((host, port)))
    base = ["--study", STUDY, "--storage", url, "--artifacts", str(tmp_path / "a")]
    assert dashboard.main(base) == 0
    assert dashboard.main([*base, "--host", "0.0.0.0", "--port", "9999"]) == 0
    assert seen == [("127.0.0.1", 8080), ("0.0.0.0", 9999)]


def test_a_trial_whose_checkpoint_retention_removed_still_shows(server) -> None:
    """The study page lists both trials (no error), and the removed file, which Optuna keeps
    listed on the finished trial, answers a note saying why it is gone, not a 500 page."""
    from search.dashboard import REMOVED

    base, _, _ = server
    sid = next(s["study_id"] for s in json.loads(get(base + "/api/studies"))["study_summaries"]
               if s["study_name"] == STUDY)
    trials = json.loads(get(f"{base}/api/studies/{sid}"))["trials"]
    assert [t["number"] for t in trials] == [0, 1]
    gone = trials[1]["artifacts"][0]
    assert get(f"{base}/artifacts/{sid}/{trials[1]['trial_id']}/{gone['artifact_id']}") == REMOVED
