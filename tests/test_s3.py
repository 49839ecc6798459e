"""``--artifacts s3://BUCKET/PREFIX`` for real: a search of two trials, its ensemble and
predict, through a local S3-compatible server (moto's server mode, started by the test), and
the server going away mid-run."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest

from search import artifacts, predict
from search import run as search_run
from search.ensemble import cli as ensemble
from search.worker.claims import claim, claim_lock
from search.worker.storage import open_storage
from tests.test_search import args, enqueue

pytestmark = pytest.mark.slow
BUCKET, PREFIX, STUDY = "mask-artifacts", "team/demo", "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on 127.0.0.1 with one empty bucket, and the environment boto3 reads."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        mp.setenv(key, value)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield SimpleNamespace(server=server, client=client, url=f"s3://{BUCKET}/{PREFIX}")
    server.stop()
    mp.undo()


def keys(client) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_search_its_ensemble_and_predict_share_artifacts_through_s3(
        s3, tiny_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    enqueue(url, STUDY, 2)
    assert search_run.main(args(STUDY, url, s3.url, tiny_data, 2, "--pruner", "none")) == 0
    study = optuna.load_study(study_name=STUDY, storage=url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    stored = keys(s3.client)
    assert stored and all(k.startswith(PREFIX + "/") for k in stored)
    store = artifacts.open_store(s3.url)
    for t in study.trials:  # every artifact a trial names is in the bucket, whole
        ids = {v for k, v in t.user_attrs.items() if k.startswith(artifacts.ATTR_PREFIX)}
        assert {f"{PREFIX}/{i}" for i in ids} <= set(stored)
        oof = artifacts.load_array(t, store, artifacts.OOF)
        np.testing.assert_allclose(oof.sum(axis=1), 1, atol=1e-4)

    flags = ["--study", STUDY, "--storage", url, "--artifacts", s3.url, "--no-gradcam"]
    assert ensemble.main([*flags, "--size", "2"]) == 0
    submission = pd.read_csv(tmp_path / "runs" / STUDY / "submission.csv", dtype=str)
    photos = sorted((tiny_data / "eval" / "images").iterdir())[:3]
    capsys.readouterr()
    assert predict.main(["--study", STUDY, "--storage", url, "--artifacts", s3.url, "--quiet",
                         *map(str, photos)]) == 0
    rows = pd.read_csv(io.StringIO(capsys.readouterr().out), dtype={"file": str})
    answer = dict(zip(submission["ImageID"], submission["ans"].astype(int), strict=True))
    assert [int(c) for c in rows["class"]] == [answer[p.name] for p in photos]


def test_the_server_gone_mid_run_is_one_line_and_records_no_artifact(s3, tmp_path: Path) -> None:
    """A trial uploading while the S3 server is gone: the upload fails with one line naming the
    endpoint, and the trial records no artifact of that name (a reader is told it has none,
    never handed a half-written object)."""
    url = f"sqlite:///{tmp_path / 'gone.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="gone", storage=storage)
    trial = claim(study, 1, claim_lock(storage, url, "gone"), max_retry=0)
    store = artifacts.open_store(s3.url)
    artifacts.save_array(trial, store, "before", np.ones((2, 3)))
    s3.server.stop()
    try:
        with pytest.raises(Exception) as failed:
            artifacts.save_array(trial, store, "during", np.ones((4, 3)))
        message = str(failed.value)
        assert "\n" not in message.strip() and "127.0.0.1" in message
        frozen = storage.get_trial(trial._trial_id)
        assert artifacts.attr_name("during") not in frozen.user_attrs
        with pytest.raises(artifacts.DataError, match="has no artifact 'during'"):
            artifacts.load_array(frozen, store, "during")
    finally:
        s3.server.start()  # the module's other tests need it (a fresh, empty server)
        s3.client.create_bucket(Bucket=BUCKET)
