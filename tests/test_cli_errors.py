"""Configuration mistakes give one ``error: ...`` line and exit 2 from every CLI; ``--debug``
shows the traceback.

Most cases call ``main(argv)`` in-process (fast); one subprocess checks what a user really sees
on the terminal, and one checks that pretrained weights asked for offline fail at once, with
the fix, without touching the network.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

import core.train_fold
import search.dashboard
import search.ensemble.cli
import search.explain
import search.predict
import search.report
import search.run
from core.config import ConfigError, TrainConfig
from core.errors import DataError
from studies import STUDIES

ROOT = Path(__file__).resolve().parents[1]
PG_DOWN = "postgresql://postgres@127.0.0.1:1/x"  # port 1: nothing listens, refused at once

CLIS: dict[str, Callable[[list[str]], int]] = {
    "run": search.run.main,
    "ensemble": search.ensemble.cli.main,
    "dashboard": search.dashboard.main,
    "train_fold": core.train_fold.main,
    "predict": search.predict.main,
    "explain": search.explain.main,
    "report": search.report.main,
}


@pytest.fixture(autouse=True)
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private runs folder, and a working directory where a stray ./runs would show up."""
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MASK_SEARCH_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs"


def one_error(capfd: pytest.CaptureFixture, code: int) -> str:
    """The single error line of a failed command (asserting exit 2 and no traceback)."""
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


# (cli, argv, words the one line must contain); {tmp} is the test's tmp_path.
CASES = [
    ("run", ["--study", "nope", "--trials", "1"], ["unknown study 'nope'", "demo", "mask"]),
    ("run", ["--study", "../escape", "--trials", "1"], ["study name", "'../escape'"]),
    ("run", ["--study", "/etc/passwd", "--trials", "1"], ["study name"]),
    ("run", ["--study", "demo", "--trials", "1", "--data", "{tmp}/no_such_dir"],
     ["no_such_dir", "does not exist"]),
    ("run", ["--study", "demo", "--trials", "1", "--storage", "foo://bar"],
     ["foo://bar", "unknown scheme"]),
    ("run", ["--study", "demo", "--trials", "1", "--storage", "postgres://u@h/db"],
     ["postgresql://"]),
    ("run", ["--study", "demo", "--trials", "1", "--storage", "sqlite:///{tmp}/a_file/x.db"],
     ["storage", "a_file"]),
    ("run", ["--study", "demo", "--trials", "1", "--storage", PG_DOWN],
     ["127.0.0.1:1", "refused"]),
    ("ensemble", ["--study", "nope"], ["nope.db", "does not exist"]),
    ("ensemble", ["--study", "../x"], ["study name"]),
    ("ensemble", ["--study", "demo", "--top", "0"], ["--top"]),
    ("ensemble", ["--study", "demo", "--storage", "foo://bar"], ["unknown scheme"]),
    ("ensemble", ["--study", "demo", "--storage", PG_DOWN], ["127.0.0.1:1", "refused"]),
    ("dashboard", ["--study", "nope"], ["nope", "search.run first"]),
    ("dashboard", ["--study", "../x"], ["study name"]),
    ("dashboard", ["--study", "demo", "--storage", "foo://bar"], ["unknown scheme"]),
    ("dashboard", ["--study", "demo", "--storage", PG_DOWN], ["127.0.0.1:1", "refused"]),
    ("dashboard", ["--study", "demo", "--storage", "sqlite:///{tmp}/a_file/x.db"],
     ["storage", "a_file"]),
    ("train_fold", ["--data", "{tmp}/no_such_dir"], ["no_such_dir", "does not exist"]),
    ("train_fold", ["--data", "{tmp}", "--set", "backbone=no_such_net"],
     ["backbone", "no_such_net", "timm"]),
    ("train_fold", ["--data", "{tmp}", "--set", "lr=-1"], ["'lr'"]),
    ("train_fold", ["--data", "{tmp}", "--fold", "7"], ["--fold"]),
    ("train_fold", ["--data", "{tmp}", "--set", "nonsense"], ["key=value"]),
    ("predict", ["--study", "nope", "x.jpg"], ["nope", "search.run first"]),
    ("explain", ["--study", "nope"], ["nope", "search.run first"]),
    ("report", ["--study", "nope"], ["nope", "search.run first"]),
]

AFTER_SEARCH = ("predict", "explain", "report")


def after_search_argv(cli: str, url: str) -> list[str]:
    return ["--study", "demo", "--storage", url, *(["photo.jpg"] if cli == "predict" else [])]


@pytest.mark.parametrize("cli", AFTER_SEARCH)
def test_a_study_without_a_complete_trial_is_one_line(cli, tmp_path, capfd):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    study = optuna.create_study(study_name="demo", storage=url, direction="maximize")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    line = one_error(capfd, CLIS[cli](after_search_argv(cli, url)))
    assert "no complete trial" in line and "search.run --study demo" in line


@pytest.mark.parametrize("cli", ("predict", "report"))
def test_a_study_without_an_ensemble_says_to_write_it(cli, tmp_path, capfd):
    url = f"sqlite:///{tmp_path / 'done.db'}"
    study = optuna.create_study(study_name="demo", storage=url, direction="maximize")
    study.tell(study.ask(), 0.5)
    line = one_error(capfd, CLIS[cli](after_search_argv(cli, url)))
    assert "no ensemble yet" in line and "python -m search.ensemble --study demo" in line


@pytest.mark.parametrize(("cli", "argv", "words"), CASES,
                         ids=[f"{c}:{' '.join(a)[:60]}" for c, a, _ in CASES])
def test_expected_problem_is_one_line_and_exit_2(cli, argv, words, tmp_path, capfd):
    a_file(tmp_path)
    line = one_error(capfd, CLIS[cli]([a.replace("{tmp}", str(tmp_path)) for a in argv]))
    for word in words:
        assert word in line


def test_missing_data_leaves_no_study(tmp_path, runs, capfd):
    """A typo in --data must not create the study: the rerun with the right path starts clean."""
    one_error(capfd, search.run.main(["--study", "demo", "--trials", "1", "--data",
                                      str(tmp_path / "typo")]))
    db = runs / "demo.db"
    if db.exists():
        assert optuna.get_all_study_summaries(f"sqlite:///{db}") == []


RUN_HELP = "(python -m search.run --help lists the flags)"
FLAG_ERRORS = [
    (["--trials", "0"], f"argument --trials: must be at least 1, got 0 {RUN_HELP}"),
    (["--trials", "-1"], f"argument --trials: must be at least 1, got -1 {RUN_HELP}"),
    (["--trials", "two"], f"argument --trials: expected a whole number, got 'two' {RUN_HELP}"),
    ([], f"the following arguments are required: --trials {RUN_HELP}"),
    (["--trials", "1", "--max-retry", "-1"],
     f"argument --max-retry: must be at least 0, got -1 {RUN_HELP}"),
    (["--trials", "1", "--hours", "0"], f"argument --hours: must be positive, got 0.0 {RUN_HELP}"),
    (["--trials", "1", "--hours", "1", "--timeout", "5"],
     f"argument --timeout: not allowed with argument --hours {RUN_HELP}"),
    (["--trials", "1", "--gpus", "0,0"],
     f"argument --gpus: expected distinct GPU numbers like 0,1,2,3, got '0,0' {RUN_HELP}"),
    (["--trials", "1", "--bogus"], f"unrecognized arguments: --bogus {RUN_HELP}"),
]


@pytest.mark.parametrize(("argv", "message"), FLAG_ERRORS, ids=[" ".join(a) or "none"
                                                                for a, _ in FLAG_ERRORS])
def test_a_flag_mistake_is_exactly_one_line_and_exit_2(argv, message, capfd):
    """``--trials 0`` and every other flag mistake: the whole stderr is one ``error:`` line (no
    usage block), nothing on stdout, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        search.run.main(["--study", "demo", *argv])
    assert exit_info.value.code == 2
    assert capfd.readouterr() == ("", f"error: {message}\n")


MISSING = {  # each CLI run without arguments: what it must say, whole
    "search.run": "--study, --trials", "search.ensemble": "--study",
    "search.dashboard": "--study", "search.predict": "paths, --study",
    "search.explain": "--study", "search.report": "--study", "search.weights": "--study, --out",
    "search.labels": "--study", "search.refit": "--study",
    "search.ensemble.score": "submission, answers", "core.train_fold": "--data",
    "core.cache": "--data", "core.synth": "--out",
}
#: Commands whose ``main`` lives in another module of their package (``__main__`` calls it).
ENTRY = {"search.ensemble": "search.ensemble.cli"}


@pytest.mark.parametrize("module", MISSING)
def test_every_cli_says_a_flag_mistake_in_one_line(module, capfd):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(ENTRY.get(module, module)).main([])
    assert exit_info.value.code == 2
    assert capfd.readouterr() == ("", f"error: the following arguments are required: "
                                      f"{MISSING[module]} (python -m {module} --help lists the "
                                      f"flags)\n")


def test_every_parser_is_the_one_line_parser():
    """One source of truth: no CLI in core/ or search/ calls argparse's parser itself (its
    errors print the usage block); they all use ``core.cli.Parser``. And every module there with
    a ``main`` is in ``MISSING`` above (or ``ENTRY``), so a new CLI is checked too."""
    direct, mains = [], set()
    for pkg in ("core", "search"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(f.read_text(), str(f))
            direct += [f"{f.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(tree)
                       if isinstance(n, ast.Call) and f != ROOT / "core" / "cli.py"
                       and "ArgumentParser" in {getattr(n.func, "attr", None),
                                                getattr(n.func, "id", None)}]
            if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
                mains.add(".".join(f.relative_to(ROOT).with_suffix("").parts))
    assert direct == []
    assert mains == {ENTRY.get(m, m) for m in MISSING}


def test_unknown_backbone_in_a_study_space_is_one_line(synth_data, monkeypatch, capfd):
    """A study space naming a backbone timm does not have: the first trial stops the run with
    one line (the trial is recorded as FAIL), not Optuna's logged traceback."""
    monkeypatch.setattr("studies.demo.BACKBONES", ("resnet_typo",))
    code = search.run.main(["--study", "demo", "--trials", "1", "--data", str(synth_data),
                            "--folds", "2", "--epochs", "1", "--device", "cpu"])
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("error: config field 'backbone'")
    assert "resnet_typo" in err


def test_pretrained_without_cache_and_without_network_fails_fast(tmp_path, monkeypatch):
    """Weights not in an (empty) cache and the hub unreachable: ConfigError with the fix after
    one connect with a short timeout and no waiting, and the hub client is never asked (it
    would retry for a minute)."""
    import huggingface_hub
    from huggingface_hub import constants

    from core.models import create_model

    connects, sleeps = [], []

    def no_network(address, timeout=None, *args, **kwargs):
        connects.append((address, timeout))
        raise OSError("network is unreachable")

    def must_not_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("socket.create_connection", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", must_not_download)
    monkeypatch.setattr("timm.models._hub.hf_hub_download", must_not_download, raising=False)
    monkeypatch.setattr("time.sleep", sleeps.append)
    with pytest.raises(ConfigError) as e:
        create_model(TrainConfig(backbone="resnet18", pretrained=True))
    assert [address for address, _ in connects] == [("huggingface.co", 443)]  # no retry
    assert connects[0][1] is not None and 0 < connects[0][1] <= 5  # a dead host: seconds
    assert sleeps == []
    msg = str(e.value)
    assert "resnet18" in msg and "pretrained_file=" in msg and "cannot be reached" in msg
    assert "\n" not in msg


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_terminal_sees_exactly_one_line(runs):
    env = {"MASK_SEARCH_RUNS": str(runs)}
    plain = run_cli(["-m", "search.run", "--study", "nope", "--trials", "1"], env)
    assert plain.returncode == 2
    assert plain.stdout == ""
    assert plain.stderr.splitlines() == [
        f"error: unknown study 'nope'; known studies: {', '.join(sorted(STUDIES))}"]
    flag = run_cli(["-m", "search.run", "--study", "demo", "--trials", "0"], env)
    assert (flag.returncode, flag.stdout, flag.stderr) == (
        2, "", "error: argument --trials: must be at least 1, got 0 "
               "(python -m search.run --help lists the flags)\n")


@pytest.mark.parametrize("cli", ["run", "ensemble", "dashboard", "train_fold"])
def test_debug_lets_the_exception_through(cli, tmp_path, monkeypatch):
    """``--debug`` (or MASK_SEARCH_DEBUG=1) re-raises, so Python prints the traceback."""
    argv = {"run": ["--study", "nope", "--trials", "1"], "ensemble": ["--study", "nope"],
            "dashboard": ["--study", "nope"],
            "train_fold": ["--data", str(tmp_path), "--set", "backbone=no_such_net"]}[cli]
    with pytest.raises((ConfigError, DataError)):
        CLIS[cli]([*argv, "--debug"])
    monkeypatch.setenv("MASK_SEARCH_DEBUG", "1")
    with pytest.raises((ConfigError, DataError)):
        CLIS[cli](argv)


@pytest.mark.slow
def test_pretrained_offline_cli_names_the_fix_without_network(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache: core.train_fold stops before reading
    any data, with one line saying how to get weights, and without one connect or wait (each
    connect or sleep in the process would add a line to its stderr)."""
    watched = ("import runpy, socket, sys, time\n"
               "def connect(*a, **k):\n"
               "    print('connect', a[:1], file=sys.stderr)\n"
               "    raise OSError('network is unreachable')\n"
               "def sleep(s):\n"
               "    print('sleep', s, file=sys.stderr)\n"
               "socket.create_connection, time.sleep = connect, sleep\n"
               "runpy.run_module('core.train_fold', run_name='__main__', alter_sys=True)\n")
    done = run_cli(["-c", watched, "--data", str(tmp_path), "--set", "pretrained=true",
                    "--set", "backbone=resnet18"],
                   {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pretrained weights for backbone "
                                                   "'resnet18'"), lines
    assert "pretrained_file=" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


class Stop(DataError):
    """Raised by a stand-in for data loading: the run got past its settings checks."""


def old_study(tmp_path: Path, **attrs) -> tuple[str, Path]:
    """A demo study as an earlier run left it (its settings as study user attrs); URL, data."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    url = f"sqlite:///{tmp_path / 'old.db'}"
    study = optuna.create_study(study_name="demo", storage=url, direction="maximize")
    settings = {"n_folds": 2, "fold_seed": 0, "data_dir": str(data), "epochs": 1,
                "report_mode": "epoch", "pruner": "median", "corrections": None,
                "study_module": "studies.demo", **attrs}
    for key, value in settings.items():
        study.set_user_attr(key, value)
    return url, data


def stop_at_data(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Record what the run would load and build, then stop it before any training."""
    seen: dict = {}

    def load(data_dir, corrections, *args, **kwargs):
        seen["corrections"] = corrections
        raise Stop("stopped before loading data")

    def pruner(name, *args, **kwargs):
        seen["pruner"] = name
        return optuna.pruners.NopPruner()

    monkeypatch.setattr("search.run.load_study_data", load)
    monkeypatch.setattr("search.run.create_pruner", pruner)
    return seen


@pytest.mark.parametrize(("mode", "created_with", "asked"),
                         [("epoch", "median", "wilcoxon"), ("fold", "wilcoxon", "median"),
                          ("fold", "wilcoxon", "hyperband")])
def test_a_pruner_that_reads_steps_differently_is_refused(mode, created_with, asked, tmp_path,
                                                          monkeypatch, capfd):
    """Median steps are ``fold * epochs + epoch``, Wilcoxon's are ``fold``: one study must not
    hold both, so a rerun asking for the other kind stops with one line and trains nothing."""
    url, _ = old_study(tmp_path, report_mode=mode, pruner=created_with)
    seen = stop_at_data(monkeypatch)
    line = one_error(capfd, search.run.main(["--study", "demo", "--trials", "1", "--storage", url,
                                             "--pruner", asked]))
    assert f"report_mode={mode!r}" in line and f"--pruner {asked}" in line
    assert seen == {}
    assert optuna.load_study(study_name="demo", storage=url).user_attrs["report_mode"] == mode


@pytest.mark.parametrize(("mode", "created_with", "asked", "used"),
                         [("fold", "wilcoxon", None, "wilcoxon"),
                          ("epoch", "hyperband", None, "hyperband"),
                          ("fold", "wilcoxon", "none", "none"),
                          ("epoch", "median", "halving", "halving")])
def test_a_rerun_uses_a_pruner_of_the_study_mode(mode, created_with, asked, used, tmp_path,
                                                 monkeypatch, capfd):
    url, _ = old_study(tmp_path, report_mode=mode, pruner=created_with)
    seen = stop_at_data(monkeypatch)
    flag = ["--pruner", asked] if asked else []
    line = one_error(capfd, search.run.main(["--study", "demo", "--trials", "1", "--storage", url,
                                             *flag]))
    assert "stopped before loading data" in line
    assert seen["pruner"] == used


def test_a_new_study_stores_its_report_mode_and_corrections(tmp_path, monkeypatch, capfd):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corrections.csv").write_text("id,field,value\n")
    url = f"sqlite:///{tmp_path / 'new.db'}"
    seen = stop_at_data(monkeypatch)
    one_error(capfd, search.run.main(["--study", "demo", "--trials", "1", "--storage", url,
                                      "--data", str(data), "--pruner", "wilcoxon"]))
    attrs = optuna.load_study(study_name="demo", storage=url).user_attrs
    assert attrs["report_mode"] == "fold" and attrs["pruner"] == "wilcoxon"
    assert attrs["corrections"] == str(data / "corrections.csv") == str(seen["corrections"])


def test_a_rerun_uses_the_corrections_the_study_was_created_with(tmp_path, monkeypatch, capfd):
    """A corrections file that appeared since the study was created must not change the labels
    of later trials (the ensemble reads the stored one too)."""
    url, data = old_study(tmp_path, corrections=None)
    (data / "corrections.csv").write_text("id,field,value\n")
    seen = stop_at_data(monkeypatch)
    one_error(capfd, search.run.main(["--study", "demo", "--trials", "1", "--storage", url]))
    assert seen["corrections"] is None
    assert optuna.load_study(study_name="demo", storage=url).user_attrs["corrections"] is None


@pytest.mark.slow
def test_trials_failing_in_a_row_end_the_run_with_the_summary_and_one_error(
        tmp_path, monkeypatch, capfd, caplog):
    """Every trial raising (a dead GPU): a warning per trial, then the summary and one error
    line naming the last error, exit 2; not an endless night of FAIL trials."""
    url, _ = old_study(tmp_path)

    def broken(trial: optuna.Trial) -> float:
        raise RuntimeError("CUDA error: device lost")

    monkeypatch.setattr("search.run.load_study_data", lambda *a, **k: None)
    monkeypatch.setattr("search.run.Objective", lambda *a, **k: broken)
    code = search.run.main(["--study", "demo", "--trials", "20", "--storage", url,
                            "--artifacts", str(tmp_path / "art")])
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"trial {n} failed: RuntimeError: CUDA error: device lost"
                      for n in range(5)]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 5 trials in a row failed") and "device lost" in last
    assert "0 complete, 0 pruned, 5 failed" in out
