"""A fresh clone works from its own root (issue 16).

transformers >= 5.25 imports Hugging Face's ``kernels`` package. Our top-level ``kernels/`` folder
used to be a regular package, so from the repository root (``python -m ...`` puts the current
folder on sys.path, and the ``fastft`` command re-executed itself that way) it shadowed theirs and
every model load failed. These tests run the real commands as subprocesses from the root and from a
folder holding files named like fastft's and transformers' modules.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_helpers import bundled_rows, make_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
FASTFT = str(Path(sys.executable).with_name("fastft"))
HF_KERNELS = importlib.util.find_spec("kernels") is not None and \
    importlib.util.find_spec("kernels").origin not in (None, "namespace")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(**env))


def test_kernels_folder_is_not_a_top_level_package():
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists()
    import fastft.kernels.swiglu as sw

    assert Path(sw.__file__).resolve().parent == (ROOT / "kernels").resolve()


@pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's kernels package is not installed "
                    "(transformers < 5.25 does not need it)")
def test_hf_kernels_wins_from_the_repository_root():
    out = _run([sys.executable, "-c", "import transformers.modeling_utils, kernels; print(kernels.__file__)"],
               cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    path = Path(out.stdout.strip().splitlines()[-1]).resolve()
    # a virtualenv may live inside the clone (CI's .venv): what matters is that it is not our folder
    assert (ROOT / "kernels").resolve() not in path.parents, f"`kernels` came from the repository: {path}"
    assert "site-packages" in path.parts, path


def test_train_help_from_the_repository_root():
    out = _run([FASTFT, "train", "--help"], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CONFIG" in out.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(folder / "model")
    data = write_jsonl(folder / "train.jsonl", bundled_rows(40))
    return model, data


def _one_step(tiny, out_dir: Path) -> list[str]:
    model, data = tiny
    return [FASTFT, "train", "--model.path", str(model), "--data.train_file", str(data),
            "--train.max_steps", "1", "--train.batch_size", "2", "--train.threads", "1",
            "--train.progress", "false", "--output.tensorboard", "false", "--data.cache", "false",
            "--output.dir", str(out_dir)]


@pytest.mark.slow
def test_one_training_step_from_the_repository_root(tiny, tmp_path):
    out = _run(_one_step(tiny, tmp_path / "run"), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.slow
def test_callers_own_modules_do_not_change_what_fastft_imports(tiny, tmp_path):
    """A user's kernels.py / data.py / optim.py / transformers.py next to where they run
    ``fastft train`` must never be imported: each one writes a marker file if it is."""
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "imported.txt"
    for name in ("kernels", "data", "optim", "trainer", "transformers", "torch", "fastft", "yaml", "click"):
        (work / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\nraise ImportError('user file {name}.py imported')\n")
    for hugepages in ("1", "0"):  # with and without fastft's re-exec
        out = _run(_one_step(tiny, tmp_path / f"run{hugepages}"), cwd=work, FASTFT_HUGEPAGES=hugepages)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert not marker.exists(), f"fastft imported the caller's files: {marker.read_text()}"


BAD_FILES = {
    "missing": (None, "file not found"),
    "directory": ("dir", "data"),
    "malformed": ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', ":2"),
    "columns": ('{"question": "a", "answer": "b"}\n', "instruction"),
}


def _bad_file(kind: str, tmp_path: Path) -> Path:
    content, _ = BAD_FILES[kind]
    path = tmp_path / f"{kind}.jsonl"
    if content == "dir":
        path.mkdir()
        (path / "notes.txt").write_text("not a dataset\n")
    elif content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_training_file_fails_before_the_model_load(kind, tmp_path, monkeypatch):
    """In process: the model loader is never reached (it would raise here)."""
    import fastft.models.loading as ml
    from fastft.errors import UserError
    from fastft.train.cli import run

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data file was checked")

    monkeypatch.setattr(ml, "load_model_and_tokenizer", no_load)
    monkeypatch.setattr(ml, "load_tokenizer", no_load)
    path = _bad_file(kind, tmp_path)
    with pytest.raises(UserError) as e:
        run(None, ["--data.train_file", str(path), "--output.dir", str(tmp_path / "run"),
                   "--data.cache", "false"])
    msg = str(e.value)
    assert "\n" not in msg and str(path.name) in msg and BAD_FILES[kind][1] in msg, msg
    assert not (tmp_path / "run").exists(), "nothing may be written for a bad data file"


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_training_file_cli_one_line_exit_2(kind, tmp_path):
    """The command: exit 2, one line on stderr, no traceback, no run folder - with the default
    model (a 20 s GGUF load), so a late check would show in the time printed below."""
    path = _bad_file(kind, tmp_path)
    t0 = time.perf_counter()
    out = _run([FASTFT, "train", "--data.train_file", str(path), "--output.dir", str(tmp_path / "run")],
               cwd=tmp_path, timeout=300)
    took = time.perf_counter() - t0
    print(f"{kind}: exit {out.returncode} in {took:.1f} s: {out.stderr.strip()}")
    assert out.returncode == 2, out.stdout[-1000:] + out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    assert path.name in lines[0] and BAD_FILES[kind][1] in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_fastft_env_shows_a_broken_optional_package(tmp_path):
    """An installed package that fails to import is reported with its error, not "not installed"."""
    pkg = tmp_path / "site" / "matplotlib"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('broken install: libfoo.so missing')\n")
    out = _run([sys.executable, "-c", "from fastft.cli import main; main(['env'])"], cwd=tmp_path,
               PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("matplotlib:"))
    assert "fails to import" in line and "libfoo.so missing" in line, line
