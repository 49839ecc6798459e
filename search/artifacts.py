"""Trial artifacts (probabilities, checkpoints, plots) through Optuna's artifact API.

Why a module: the objective writes and the ensemble reads the same artifacts, so the naming
rule lives here once. Each artifact is uploaded with ``optuna.artifacts.upload_artifact``
(which records its metadata on the trial, so optuna-dashboard lists it) and its id is also
stored in the trial's user attr ``artifact_<name>``: that is how a reader finds it by name.

What a trial leaves (the contract the ensemble, dashboard and retries read):

- per fold ``k``, when the fold ends: ``oof_fold<k>`` (float32, that fold's rows in table
  order), ``eval_fold<k>`` (float32 (N_eval, 18)), ``checkpoint_fold<k>`` (a state_dict), then
  the user attr ``fold_done_<k>`` = ``{f1, selected_epoch, best_f1, best_epoch, epochs, curve}``;
- a complete trial: ``oof`` (float32 (N_train, 18), table order), ``eval`` (float32
  (N_eval, 18), info.csv order, mean of the fold models), ``confusion`` (PNG), ``class_f1``
  (JSON, class name -> F1 or null);
- user attrs ``config``, the three fingerprints (``core.fingerprints.fingerprints``), ``fold_f1``,
  ``epochs_trained``, ``images_per_s``, ``worker``; when relevant ``resumed_folds``,
  ``pruned_because``, ``error`` (a FAIL's reason), ``clamped`` (``{name: {sampled, used}}``).
"""

from __future__ import annotations

import contextlib
import io
import json
import mimetypes
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, Trial

from core.atomic import atomic_write, remove_dead_temps
from core.errors import DataError

if TYPE_CHECKING:  # the protocol every Optuna store (and _PrefixedStore) follows
    from optuna.artifacts._protocol import ArtifactStore

ATTR_PREFIX = "artifact_"


class _PrefixedStore:
    """Keys under ``prefix/`` in another store; Boto3ArtifactStore has no prefix of its own."""

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self._store, self._prefix = store, prefix.strip("/")

    def _key(self, artifact_id: str) -> str:
        return f"{self._prefix}/{artifact_id}" if self._prefix else artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._store.open_reader(self._key(artifact_id))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._store.write(self._key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        self._store.remove(self._key(artifact_id))


class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
    """``FileSystemArtifactStore`` whose writes are all-or-nothing.

    Optuna's store copies straight into the final file, and ``upload_artifact`` records the
    artifact on the trial *before* copying, so a kill mid-upload would leave a truncated file
    under a recorded id (the dashboard would serve it; a reader would trust it). Here the bytes
    go to ``.<id>.<pid>.tmp`` in the same folder, are fsynced, and only then renamed to the id:
    the id either names the whole file or nothing (``ArtifactNotFound``). Temps left by killed
    processes are removed by the next write.
    """

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        final = self._get_filepath(artifact_id)
        remove_dead_temps(final.parent)  # every id is written once: reap all dead uploads here

        def copy(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(content_body, f)

        atomic_write(final, copy)


def open_store(path_or_url: str | Path) -> ArtifactStore:
    """A folder -> ``AtomicFileSystemArtifactStore`` (created); ``s3://bucket[/prefix]`` -> S3.

    S3 uploads are atomic per object already (an object appears whole or not at all).

    The folder is what ``optuna-dashboard --artifact-dir`` takes. For S3-compatible services
    set ``AWS_ENDPOINT_URL`` and the usual credentials in the environment (boto3 reads them).
    """
    text = str(path_or_url)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not bucket:
            raise DataError(f"artifact store {text!r}: no bucket name after s3://")
        try:
            import boto3  # noqa: F401  (lazy: optional, the s3 extra; Boto3ArtifactStore needs it)
        except ImportError:
            raise DataError(
                f"artifact store {text!r} needs boto3, which is not installed: pip install boto3"
            ) from None
        store = optuna.artifacts.Boto3ArtifactStore(bucket)
        return _PrefixedStore(store, prefix) if prefix.strip("/") else store
    if "://" in text:
        raise DataError(f"artifact store {text!r}: only a folder or s3://bucket/prefix is known")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise DataError(f"artifact store {text!r} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return AtomicFileSystemArtifactStore(path)


def attr_name(name: str) -> str:
    """User-attr key holding the id of artifact ``name``."""
    return ATTR_PREFIX + name


def save_file(trial: Trial, store: ArtifactStore, name: str, path: str | Path) -> str:
    """Upload ``path`` as artifact ``name`` of a running trial; returns the artifact id.

    The uploaded file keeps its base name (the dashboard shows it); the id goes to the user
    attr ``artifact_<name>`` so readers find it by ``name``.
    """
    if not isinstance(trial, Trial):
        raise TypeError("save_file needs a running optuna.Trial (finished trials are read-only)")
    artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
    trial.set_user_attr(attr_name(name), artifact_id)
    return artifact_id


#: Where optuna-dashboard looks for artifacts added to a trial after it finished: Optuna
#: refuses to change a finished trial (``UpdateFinishedTrialError``), so their records live on
#: the study, keyed by trial id (optuna_dashboard.artifact._backend, kept for this purpose).
FINISHED_TRIAL_PREFIX = "dashboard:artifacts:"


def attach_to_finished(study: optuna.Study, trial: FrozenTrial, store: ArtifactStore,
                       path: str | Path) -> str:
    """Add ``path`` to a finished trial's artifacts (the dashboard lists it under the trial);
    a file of the same name attached before is replaced. Returns the artifact id."""
    path = Path(path)
    for key, meta in finished_artifacts(study, trial).items():
        if meta["filename"] == path.name:
            # "null": the dashboard skips a record that reads as None (keys cannot be deleted)
            study._storage.set_study_system_attr(study._study_id, key, "null")
            with contextlib.suppress(ArtifactNotFound):
                store.remove(meta["artifact_id"])
    aid = str(uuid.uuid4())
    with open(path, "rb") as f:
        store.write(aid, f)
    meta = {"artifact_id": aid, "filename": path.name,
            "mimetype": mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            "encoding": None}
    study._storage.set_study_system_attr(
        study._study_id, f"{FINISHED_TRIAL_PREFIX}{trial._trial_id}:{aid}", json.dumps(meta))
    return aid


def finished_artifacts(study: optuna.Study, trial: FrozenTrial) -> dict[str, dict]:
    """The artifacts ``attach_to_finished`` added to ``trial``: study attr key -> record."""
    prefix = f"{FINISHED_TRIAL_PREFIX}{trial._trial_id}:"
    attrs = study._storage.get_study_system_attrs(study._study_id)
    found = {k: json.loads(v) for k, v in attrs.items() if k.startswith(prefix)}
    return {k: meta for k, meta in found.items() if meta is not None}


def save_array(trial: Trial, store: ArtifactStore, name: str, array: np.ndarray,
               dtype: np.dtype | type | None = np.float32) -> str:
    """Save ``array`` (as float32 unless ``dtype`` says otherwise) as ``<name>.npy``."""
    arr = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="mask_search_artifact_") as tmp:
        path = Path(tmp) / f"{name}.npy"
        np.save(path, arr, allow_pickle=False)
        return save_file(trial, store, name, path)


def artifact_id(trial: FrozenTrial | Trial, name: str) -> str:
    """The id of artifact ``name`` of ``trial``; ``DataError`` naming both when absent."""
    value = trial.user_attrs.get(attr_name(name))
    if not value:
        raise DataError(
            f"trial {trial.number} has no artifact '{name}' (user attr {attr_name(name)!r} "
            "missing or removed)"
        )
    return str(value)


def _read_bytes(trial: FrozenTrial | Trial, store: ArtifactStore, name: str) -> bytes:
    aid = artifact_id(trial, name)
    try:
        with store.open_reader(aid) as reader:
            return reader.read()
    except ArtifactNotFound:
        raise DataError(
            f"trial {trial.number}: artifact '{name}' ({aid}) is not in the artifact store "
            "(wrong --artifacts folder, or it was removed)"
        ) from None


def load_array(trial: FrozenTrial | Trial, store: ArtifactStore, name: str) -> np.ndarray:
    """The array saved by ``save_array`` under ``name`` for this trial."""
    data = _read_bytes(trial, store, name)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise DataError(f"trial {trial.number}: artifact '{name}' is not a .npy array: {e}") \
            from None


def load_file(
    trial: FrozenTrial | Trial, store: ArtifactStore, name: str, dest: str | Path
) -> Path:
    """Copy artifact ``name`` of this trial to ``dest`` (written to a temp name, then renamed)."""
    aid = artifact_id(trial, name)

    def copy(tmp: Path) -> None:
        try:
            with store.open_reader(aid) as reader, open(tmp, "wb") as out:
                shutil.copyfileobj(reader, out)
        except ArtifactNotFound:
            raise DataError(f"trial {trial.number}: artifact '{name}' ({aid}) is not in the "
                            "artifact store (wrong --artifacts folder, or it was removed)"
                            ) from None

    return atomic_write(dest, copy)


def remove_artifact(trial: FrozenTrial | Trial, store: ArtifactStore, name: str) -> bool:
    """Delete artifact ``name`` from the store (checkpoint retention); True if it was there.

    A running trial also gets its user attr blanked (Optuna cannot delete attrs). A finished
    trial's attrs are read-only in Optuna, so its attr keeps the id and readers get a
    ``DataError`` saying the artifact was removed.
    """
    value = trial.user_attrs.get(attr_name(name))
    if not value:
        return False
    try:
        store.remove(str(value))
        found = True
    except ArtifactNotFound:
        found = False
    if isinstance(trial, Trial):
        trial.set_user_attr(attr_name(name), "")
    return found


#: Artifact names (user attr ``artifact_<name>`` holds the id; see ``search.artifacts``).
OOF, EVAL, CONFUSION, CLASS_F1 = "oof", "eval", "confusion", "class_f1"


def checkpoint_name(fold: int) -> str:
    """Artifact name of fold ``fold``'s selected-epoch ``state_dict`` (``torch.save`` file)."""
    return f"checkpoint_fold{fold}"


def checkpoint_names(trial: FrozenTrial | optuna.Trial) -> list[str]:
    """Names of the fold checkpoints ``trial`` has an artifact attr for (removed ones included).

    An attr counts when its name is exactly ``checkpoint_name(k)`` for its trailing number k.
    """
    out = []
    for key in trial.user_attrs:
        m = re.fullmatch(rf"{re.escape(ATTR_PREFIX)}(.*?)(\d+)", key)
        if m and attr_name(checkpoint_name(int(m[2]))) == key:
            out.append(checkpoint_name(int(m[2])))
    return out


def oof_fold_name(fold: int) -> str:
    """Artifact name of fold ``fold``'s validation probabilities (rows of that fold, in order)."""
    return f"oof_fold{fold}"


def eval_fold_name(fold: int) -> str:
    """Artifact name of fold ``fold``'s model's eval probabilities."""
    return f"eval_fold{fold}"


def fold_done_attr(fold: int) -> str:
    """User attr set (to a small summary dict) once fold ``fold`` is saved."""
    return f"fold_done_{fold}"
