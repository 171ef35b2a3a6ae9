"""Package-level checks: the extension loads, backend selection honours FASTFT_BACKEND,
the CLI prints the environment, and importing fastft survives a missing extension."""
import subprocess
import sys

import pytest
import torch

from fastft import _backend


def test_cpu_extension_builds_and_reports_features():
    ext = _backend.cpu_ext()
    assert ext is not None, "fastft._C was not built by the install"
    feats = ext.cpu_features()
    assert set(feats) >= {"avx2", "avx512f", "omp_max_threads"}
    assert feats["omp_max_threads"] >= 1


def test_auto_never_picks_triton_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "auto")
    for op in _backend.OP_BACKENDS:
        assert _backend.choose_backend(op, "cpu") in ("cpu", "torch")


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    assert _backend.choose_backend("adamw", "cpu") == "torch"
    monkeypatch.setenv("FASTFT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' requested"):
        _backend.choose_backend("adamw", "cpu")
    monkeypatch.setenv("FASTFT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTFT_BACKEND='bogus'"):
        _backend.choose_backend("adamw", "cpu")


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "cuda")
    assert _backend.choose_backend("adamw", "cpu", forced="torch") == "torch"


def test_fastft_env_command():
    out = subprocess.run([sys.executable, "-m", "fastft.cli", "env"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch: " + torch.__version__ in out.stdout
    assert "avx512f" in out.stdout
    for op in _backend.OP_BACKENDS:
        assert f"  {op}: " in out.stdout


def test_import_falls_back_without_extension():
    # Hide fastft._C: importing fastft and choosing a backend must still work, with one warning.
    code = (
        "import sys, warnings\n"
        "sys.modules['fastft._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "import fastft, fastft._backend as b\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    print(b.choose_backend('adamw', 'cpu'), b.choose_backend('cross_entropy', 'cpu'))\n"
        "    print(len([x for x in w if 'falling back' in str(x.message)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[:2] == ["torch", "torch"]
    assert lines[2] == "1"


def test_every_package_ships():
    """pyproject.toml lists fastft's packages by hand (kernels/ ships through a symlink, which
    discovery would not follow); a new package folder missing from the list is left out of a
    wheel install (fastft.models and fastft.train once were)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "fastft").rglob("__init__.py")}
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
    assert "fastft.kernels" in listed
