"""The fake-quant kernel's build: announced, in a folder keyed by its sources, shared by checkouts.

Each checkout is a copy of the hmqsearch package at another path, as a second clone would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hmqsearch.kernels import backend

ROOT = Path(__file__).resolve().parents[1]
ANNOUNCEMENT = "hmqsearch: compiling the CPU fake-quant kernel once, about a minute"
CHECK = "import hmqsearch.kernels as k; print(k.__file__); print(k.active_backend('cpu'))"


def _checkout(dest: Path) -> Path:
    shutil.copytree(ROOT / "hmqsearch", dest / "hmqsearch", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _fresh_cpu_build(monkeypatch: pytest.MonkeyPatch, kernels_dir: Path) -> None:
    """This process's CPU build as if it had not been attempted yet, from ``kernels_dir``'s sources."""
    monkeypatch.setattr(backend, "_HERE", kernels_dir)
    fresh = backend._Build(backend.CPU_KERNELS, backend._BUILDS["cpu"].name, backend._BUILDS["cpu"].sources)
    monkeypatch.setitem(backend._BUILDS, "cpu", fresh)
    monkeypatch.delenv(backend.DISABLE_ENV, raising=False)


def test_build_folder_is_keyed_by_the_sources(tmp_path, monkeypatch):
    """Two checkouts of the same sources build in one folder; a changed source in another."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folders = []
    for name, edit in (("a", False), ("b", False), ("c", True)):
        kernels = _checkout(tmp_path / name) / "hmqsearch" / "kernels"
        if edit:
            with (kernels / "fake_quant_cpu.cpp").open("a") as f:
                f.write("\n// edited\n")
        monkeypatch.setattr(backend, "_HERE", kernels)
        folders.append(backend.build_directory("cpu"))
    assert folders[0] == folders[1] and folders[0].parent == tmp_path / "ext"
    assert folders[2] != folders[0] and folders[2].parent == folders[0].parent


def test_build_is_announced_and_compiles_a_copy_of_the_sources(tmp_path, monkeypatch, capsys):
    """The build says so before its minute of silence and compiles the copy kept in its folder
    (one path for every checkout); with the library there, nothing is announced."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs) or object())
    kernels = _checkout(tmp_path / "a") / "hmqsearch" / "kernels"
    _fresh_cpu_build(monkeypatch, kernels)
    assert backend.active_backend("cpu") == backend.CPU_KERNELS
    folder = backend.build_directory("cpu")
    assert ANNOUNCEMENT in capsys.readouterr().err
    assert calls[0]["build_directory"] == str(folder)
    assert calls[0]["sources"] == [str(folder / "src" / "fake_quant_cpu.cpp")]
    assert (folder / "src" / "fake_quant_cpu.cpp").read_bytes() == (kernels / "fake_quant_cpu.cpp").read_bytes()

    (folder / f"{backend._BUILDS['cpu'].name}.so").write_bytes(b"")  # what a finished build leaves
    _fresh_cpu_build(monkeypatch, _checkout(tmp_path / "b") / "hmqsearch" / "kernels")
    assert backend.active_backend("cpu") == backend.CPU_KERNELS
    assert "compiling" not in capsys.readouterr().err
    assert calls[1]["sources"] == calls[0]["sources"]


def _run_checkout(checkout: Path, extensions: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(checkout), "TORCH_EXTENSIONS_DIR": str(extensions), "OMP_NUM_THREADS": "1"}
    env.pop(backend.DISABLE_ENV, None)
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_second_checkout_reuses_the_kernel_the_first_built(tmp_path):
    """A real build (about a minute): the first checkout announces and compiles; a second
    checkout's first run loads that library without compiling or touching any build file."""
    extensions = tmp_path / "torch_extensions"
    first = _run_checkout(_checkout(tmp_path / "a"), extensions)
    assert first.stdout.split() == [str(tmp_path / "a" / "hmqsearch" / "kernels" / "__init__.py"), backend.CPU_KERNELS]
    assert ANNOUNCEMENT in first.stderr
    (folder,) = extensions.iterdir()
    built = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != "lock"}
    assert any(p.suffix == ".so" for p in built) and any(p.suffix == ".o" for p in built)

    second = _run_checkout(_checkout(tmp_path / "b"), extensions)
    assert second.stdout.split() == [str(tmp_path / "b" / "hmqsearch" / "kernels" / "__init__.py"), backend.CPU_KERNELS]
    assert "compiling" not in second.stderr, second.stderr
    assert list(extensions.iterdir()) == [folder]
    assert {p: p.stat().st_mtime_ns for p in built} == built  # nothing recompiled or rewritten


def test_every_local_include_is_copied_into_the_build_folder():
    """A header the sources include but the build does not copy fails the compile (and the run
    falls back to the PyTorch implementation): every quoted include must be among the copies."""
    import re

    from hmqsearch.kernels import backend

    kernel_dir = Path(backend.__file__).resolve().parent
    included = {
        name for path in kernel_dir.iterdir() if path.suffix in (".cpp", ".cu", ".h")
        for name in re.findall(r'#include "([^"]+)"', path.read_text())
    }
    assert included and included <= set(backend._HEADERS)
