"""``search.run --log-to wandb --log-to mlflow``, offline: each trial one run in each tracker,
read back from what the tracker wrote (W&B's offline run files, MLflow's store), checked against
the study itself."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from search import artifacts, tracking
from search import run as search_run
from tests.test_search import args, enqueue

pytestmark = pytest.mark.slow
STUDY = "demo"


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (``run-*.wandb``): a 7-byte header, then records
    in 32 KiB blocks, each with a 7-byte header (CRC, little-endian length, type: 1 whole,
    2/3/4 first/middle/last piece), the LevelDB log format W&B writes offline."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield Record.FromString(pieces)
            pieces = b""


def wandb_run(folder: Path) -> SimpleNamespace:
    """Name, group, config, final summary and logged history rows of one offline run."""
    (path,) = folder.glob("run-*.wandb")
    out = SimpleNamespace(name=None, group=None, config={}, summary={}, history=[])
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.name, out.group = rec.run.display_name, rec.run.run_group
            out.config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
        elif kind == "summary":
            out.summary.update({u.key: json.loads(u.value_json) for u in rec.summary.update
                                if u.key})
        elif kind == "history":
            out.history.append({(u.key or "/".join(u.nested_key)): json.loads(u.value_json)
                                for u in rec.history.item})
    return out


def same_curve(logged: list[tuple[int, float]], trial: optuna.trial.FrozenTrial) -> None:
    """The logged (step, value) pairs are the trial's intermediate values, step for step."""
    logged = sorted(logged)
    want = sorted(trial.intermediate_values.items())
    assert [s for s, _ in logged] == [s for s, _ in want]
    assert [v for _, v in logged] == pytest.approx([v for _, v in want])


@pytest.fixture(scope="module")
def tracked(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 3-trial demo search by 2 workers, logged to both trackers, under its own runs/."""
    root = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.setenv("MASK_SEARCH_RUNS", str(root / "runs"))
    for var in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI"):
        mp.delenv(var, raising=False)
    mp.setenv("WANDB_SILENT", "true")
    url, art = f"sqlite:///{root / 'demo.db'}", root / "artifacts"
    enqueue(url, STUDY, 3)
    assert search_run.main(args(STUDY, url, art, tiny_data, 3, "--pruner", "none",
                                "--workers", "2", "--log-to", "wandb", "--log-to", "mlflow")) == 0
    study = optuna.load_study(study_name=STUDY, storage=url)
    yield SimpleNamespace(root=root, runs=root / "runs", study=study, art=art,
                          trials={f"trial-{t.number}": t for t in study.trials})
    mp.undo()


def test_mlflow_holds_one_run_per_trial_with_params_value_state_and_curve(tracked) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked.runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(tracked.trials)
    for r in runs:
        trial = tracked.trials[r.info.run_name]
        assert r.data.params == {k: str(v) for k, v in trial.params.items()}
        assert r.data.metrics[tracking.VALUE] == pytest.approx(trial.value)
        assert r.data.tags["state"] == "COMPLETE" and r.info.status == "FINISHED"
        curve = client.get_metric_history(r.info.run_id, tracking.CURVE)
        same_curve([(m.step, m.value) for m in curve], trial)
        assert len(curve) == 2 * 2  # FOLDS x EPOCHS steps, one per epoch
        names = [a.path for a in client.list_artifacts(r.info.run_id)]
        assert names == [f"confusion_trial{trial.number}.png"]


def test_wandb_writes_one_offline_run_per_trial_grouped_by_study(tracked) -> None:
    folders = sorted((tracked.runs / STUDY / "wandb").glob("offline-run-*"))
    assert len(folders) == len(tracked.trials)
    seen = set()
    for folder in folders:
        run = wandb_run(folder)
        trial = tracked.trials[run.name]
        seen.add(run.name)
        assert run.group == STUDY
        assert {k: v for k, v in run.config.items() if not k.startswith("_")} == trial.params
        assert run.summary["state"] == "COMPLETE"
        assert run.summary[tracking.VALUE] == pytest.approx(trial.value)
        curve = [(row["_step"], row[tracking.CURVE]) for row in run.history
                 if tracking.CURVE in row]
        same_curve(curve, trial)
        images = [row["confusion/path"] for row in run.history
                  if row.get("confusion/_type") == "image-file"]
        assert len(images) == 1 and (folder / "files" / images[0]).stat().st_size > 1000
    assert seen == set(tracked.trials)


def test_a_failing_tracker_is_a_warning_and_the_search_goes_on(tracked, monkeypatch,
                                                               caplog) -> None:
    def broken(*_a, **_k):
        raise OSError("No space left on device")

    monkeypatch.setattr(tracking, "log_to_mlflow", broken)
    callback = tracking.TrackerCallback(["mlflow"], artifacts.open_store(tracked.art))
    trial = tracked.study.trials[0]
    with caplog.at_level(logging.WARNING):
        callback(tracked.study, trial)  # no exception
    assert f"could not log trial {trial.number} to mlflow: No space left" in caplog.text


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tiny_data, tmp_path, capfd,
                                                                 monkeypatch) -> None:
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    code = search_run.main(args(STUDY, url, tmp_path / "art", tiny_data, 1, "--log-to", "wandb"))
    out, err = capfd.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "wandb is not installed" in lines[0]
    assert '.[tracking]' in lines[0]
    assert not (tmp_path / "demo.db").exists()  # refused before the study was made
