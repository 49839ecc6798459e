"""``--log-to wandb|mlflow``: every finished trial of a search as one run of the user's own
experiment tracker, with its parameters, value, state, per-epoch validation curve and
confusion plot.

Why our own callbacks rather than optuna-integration's ``WeightsAndBiasesCallback`` /
``MLflowCallback``: those log a trial's parameters and final value (W&B's not its state), and
a trial here is best read from its curve (the validation macro F1 the pruner saw, per fold and
epoch) and its confusion matrix, which they cannot reach. Ours read both from the finished
trial (``intermediate_values``) and the artifact store, and log them as the tracker's own
metric history and image.

Offline first, as GPU boxes often are:

- W&B runs in offline mode unless ``$WANDB_MODE`` says otherwise: each trial is a run folder
  under ``runs/<study>/wandb/`` (``wandb sync runs/<study>/wandb/offline-run-*`` uploads them
  later); project ``$WANDB_PROJECT`` or ``mask-search``, group the study.
- MLflow logs to ``$MLFLOW_TRACKING_URI``, else ``runs/mlflow.db`` (artifacts in
  ``runs/mlflow-artifacts``), which ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``
  serves; one experiment per study.

Several workers (``--workers``, ``--gpus``, machines sharing PostgreSQL) each log the trials
they ran; a run is named after its trial number, unique in the study, so nothing clobbers.
A tracker that fails (a full disk, a server gone) costs a warning, never the search.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from core.errors import DataError
from search import artifacts, paths
from search.log import log
from search.worker.trial_loop import ERROR_ATTR

#: ``--log-to`` choices, each with the package it needs.
TRACKERS: dict[str, str] = {"wandb": "wandb", "mlflow": "mlflow"}
INSTALL = 'pip install -e ".[tracking]"'
#: The metric names every tracker gets.
CURVE, VALUE = "val_macro_f1", "oof_macro_f1"


def check_trackers(names: Sequence[str]) -> None:
    """One line naming the extra to install when a chosen tracker's package is missing, before
    any trial runs (found without importing: importing wandb takes seconds)."""
    missing = [TRACKERS[n] for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise DataError(f"--log-to {' '.join(names)}: package {', '.join(missing)} is not "
                        f"installed: {INSTALL}")


@dataclass
class TrialRun:
    """What a tracker logs of one finished trial."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    curve: list[tuple[int, float]]  # (step = fold * epochs + epoch, validation macro F1)
    tags: dict[str, str] = field(default_factory=dict)
    confusion: Path | None = None


def trial_run(study: optuna.Study, trial: FrozenTrial, store: artifacts.ArtifactStore,
              folder: Path) -> TrialRun:
    """The trial as a tracker sees it; its confusion PNG (complete trials) copied into
    ``folder``."""
    png = None
    if trial.state == TrialState.COMPLETE:
        png = folder / f"confusion_trial{trial.number}.png"
        try:
            artifacts.load_file(trial, store, artifacts.CONFUSION, png)
        except (DataError, KeyError, OSError):  # none recorded, or removed from the store
            png = None
    tags = {"study": study.study_name, "trial": str(trial.number), "state": trial.state.name}
    for key in ("pruned_because", ERROR_ATTR, "stage", "refit_of"):
        if key in trial.user_attrs:
            tags[key] = str(trial.user_attrs[key])[:500]
    return TrialRun(trial.number, trial.state.name, trial.value, dict(trial.params),
                    sorted(trial.intermediate_values.items()), tags, png)


def log_to_wandb(run: TrialRun, study_name: str, folder: Path) -> None:
    """One W&B run per trial (offline unless ``$WANDB_MODE``), grouped by study."""
    import wandb  # lazy: optional dependency (the tracking extra)

    folder.mkdir(parents=True, exist_ok=True)
    wb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mask-search"), group=study_name,
                    job_type="trial", name=f"trial-{run.number}", config=run.params,
                    tags=[run.state], dir=str(folder),
                    mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new",
                    settings=wandb.Settings(silent=True, console="off"))
    try:
        for step, value in run.curve:
            wb.log({CURVE: value}, step=step)
        if run.confusion is not None:
            wb.log({"confusion": wandb.Image(str(run.confusion))})
        wb.summary.update({**run.tags, VALUE: run.value})
    finally:
        wb.finish(exit_code=0 if run.state == TrialState.COMPLETE.name else 1)


def default_mlflow_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``runs/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.runs_dir() / 'mlflow.db'}"


def mlflow_experiment(client: Any, study_name: str) -> str:
    """The study's MLflow experiment id, made when missing (a second worker making it at the
    same moment reads the first's)."""
    from mlflow.exceptions import MlflowException  # lazy: optional dependency (tracking extra)

    exp = client.get_experiment_by_name(study_name)
    if exp is not None:
        return exp.experiment_id
    try:
        location = (paths.runs_dir() / "mlflow-artifacts" / study_name).as_uri()
        return client.create_experiment(study_name, artifact_location=location)
    except MlflowException:
        return client.get_experiment_by_name(study_name).experiment_id


def prepare_trackers(names: Sequence[str], study_name: str) -> None:
    """Make what every worker will log into before any starts: MLflow's store and the study's
    experiment (several workers creating a fresh SQLite store at once race on its schema)."""
    if "mlflow" in names:
        from mlflow import MlflowClient  # lazy: optional dependency (the tracking extra)

        mlflow_experiment(MlflowClient(tracking_uri=default_mlflow_uri()), study_name)


def log_to_mlflow(run: TrialRun, study_name: str, uri: str) -> None:
    """One MLflow run per trial in the study's experiment."""
    # lazy: optional dependency (the tracking extra)
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus

    client = MlflowClient(tracking_uri=uri)
    exp_id = mlflow_experiment(client, study_name)
    made = client.create_run(exp_id, run_name=f"trial-{run.number}", tags=run.tags)
    rid = made.info.run_id
    now = int(made.info.start_time)
    metrics = [Metric(CURVE, float(v), now, int(s)) for s, v in run.curve]
    if run.value is not None:
        metrics.append(Metric(VALUE, float(run.value), now, 0))
    params = [Param(k, str(v)) for k, v in run.params.items()]
    client.log_batch(rid, metrics=metrics, params=params)
    if run.confusion is not None:
        client.log_artifact(rid, str(run.confusion))
    ok = run.state == TrialState.COMPLETE.name
    client.set_terminated(rid, RunStatus.to_string(RunStatus.FINISHED if ok else
                                                   RunStatus.KILLED if run.state == "PRUNED"
                                                   else RunStatus.FAILED))


class TrackerCallback:
    """The ``run_worker`` callback: each trial this worker finished, to every chosen tracker."""

    def __init__(self, names: Sequence[str], store: artifacts.ArtifactStore) -> None:
        self.names = list(dict.fromkeys(names))
        self.store = store

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with tempfile.TemporaryDirectory(prefix="mask_search_track_") as tmp:
            run = trial_run(study, trial, self.store, Path(tmp))
            where = {"wandb": lambda: paths.study_dir(study.study_name),
                     "mlflow": default_mlflow_uri}
            for name in self.names:
                log_to = log_to_wandb if name == "wandb" else log_to_mlflow
                try:
                    log_to(run, study.study_name, where[name]())
                except Exception as e:  # the tracker is a view; the search goes on
                    log.warning("could not log trial %d to %s: %s", trial.number, name, e)
