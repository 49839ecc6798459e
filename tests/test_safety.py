"""Safety: no pickle-loading of files, study names and default paths stay inside runs/.

Checkpoints and probabilities come from artifact stores that other machines write to (S3,
shared folders); unpickling such a file runs whatever code it carries. So every ``torch.load``
in the repository passes ``weights_only=True`` and every ``np.load`` keeps pickles off; this is
checked on the source tree, so a new call cannot slip in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.config import ConfigError
from search import paths

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "search", "studies", "bench", "tests")


def python_files() -> list[Path]:
    files = [f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 20  # the tree was found
    return files


def calls_to(tree: ast.AST, module: str, name: str) -> list[ast.Call]:
    """Calls written ``module.name(...)`` (e.g. ``torch.load``)."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == name
            and isinstance(n.func.value, ast.Name) and n.func.value.id == module]


def keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_every_torch_load_is_weights_only() -> None:
    bad = []
    for f in python_files():
        tree = ast.parse(f.read_text(), str(f))
        for call in calls_to(tree, "torch", "load"):
            if keyword(call, "weights_only") is not True:
                bad.append(f"{f.relative_to(ROOT)}:{call.lineno}")
        for node in ast.walk(tree):  # `from torch import load` would hide a call from the check
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in {a.name for a in node.names}, f
    assert bad == [], f"torch.load without weights_only=True: {bad}"


def test_no_pickle_loading() -> None:
    bad = []
    for f in python_files():
        tree = ast.parse(f.read_text(), str(f))
        bad += [f"{f.relative_to(ROOT)}:{c.lineno} np.load(allow_pickle=True)"
                for c in calls_to(tree, "np", "load") if keyword(c, "allow_pickle") is True]
        bad += [f"{f.relative_to(ROOT)}:{c.lineno} pickle.{c.func.attr}"
                for name in ("load", "loads") for c in calls_to(tree, "pickle", name)]
    assert bad == []


def test_the_checker_finds_an_unsafe_call() -> None:
    tree = ast.parse("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
                     "torch.load(p, weights_only=True)\n")
    flags = [keyword(c, "weights_only") is True for c in calls_to(tree, "torch", "load")]
    assert flags == [False, False, True]


BAD_NAMES = ["", ".", "..", "../x", "x/..", "a/b", "/etc/passwd", "a\\b", ".hidden", "a..b",
             "demo\n", "\ndemo", "de mo", "a\x00b", "x" * 101, "dé", "~", "C:x", None]
GOOD_NAMES = ["demo", "mask", "mask_v2.1", "A-b", "x" * 100, "0"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_bad_study_names_are_refused_everywhere(name, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(paths.RUNS_ENV, str(tmp_path / "runs"))
    for fn in (paths.check_study_name, paths.study_dir, paths.default_storage_url):
        with pytest.raises(ConfigError, match="study name"):
            fn(name)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_study_names_stay_inside_runs(name, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(paths.RUNS_ENV, str(tmp_path / "runs"))
    runs = paths.runs_dir()
    assert paths.study_dir(name).parent == runs
    assert paths.default_storage_url(name) == f"sqlite:///{runs / name}.db"
    assert paths.default_artifacts_dir().parent == runs


def test_inside_refuses_escapes_including_symlinks(tmp_path) -> None:
    base = tmp_path / "runs"
    (base / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "link").symlink_to(outside)
    assert paths.inside(base, "sub/x.csv") == base.resolve() / "sub" / "x.csv"
    for escape in ("../outside", "sub/../../outside", str(outside), "link/x.csv"):
        with pytest.raises(ConfigError, match="escapes"):
            paths.inside(base, escape)

