"""Which implementation runs fake_quant: a compiled extension or plain PyTorch, and why.

Two extensions, each built on first need with ``torch.utils.cpp_extension.load``:

* CUDA tensors: ``binding.cpp`` + ``fake_quant.cu`` (needs a GPU and the CUDA toolkit);
* float32 CPU tensors: ``fake_quant_cpu.cpp`` (needs a C++ compiler): one fused pass instead
  of the PyTorch implementation's 6 (forward) and 17 (backward) elementwise passes.

Each is built in a folder named by the hash of its sources, flags, torch and Python
(``<torch extensions dir>/<name>-<hash>``, ``TORCH_EXTENSIONS_DIR`` or torch's default), from a copy
of the sources kept there: checkouts with the same sources share one build whatever their
path, and different sources never overwrite each other's.  A build is announced on stderr
(it takes about a minute); ``hmqsearch build-kernels`` does it ahead of time.

``HMQ_DISABLE_KERNELS=1``, a missing GPU or toolkit, another dtype on CPU, or a failed build
(logged as a warning) select the PyTorch implementation instead; nothing raises.  The choice
per (device type, dtype) is logged once on the ``hmqsearch.kernels`` logger.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("hmqsearch.kernels")

DISABLE_ENV = "HMQ_DISABLE_KERNELS"
CUDA_KERNELS = "cuda-kernels"
CPU_KERNELS = "cpu-kernels"
PYTORCH = "pytorch"

_HERE = Path(__file__).resolve().parent
_CPU_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    _CPU_FLAGS.append("-msse4.1")  # vectorised round-half-to-even (roundps)


@dataclass
class _Build:
    """One extension: how to build it and the outcome of the (single) attempt."""

    label: str
    name: str
    sources: tuple[str, ...]
    loaded: bool = False  # a load was attempted (successfully or not)
    extension: ModuleType | None = None
    failure: str = ""  # why the extension is unavailable after a failed attempt


_BUILDS = {
    "cuda": _Build(CUDA_KERNELS, "hmqsearch_fake_quant", ("binding.cpp", "fake_quant.cu")),
    "cpu": _Build(CPU_KERNELS, "hmqsearch_fake_quant_cpu", ("fake_quant_cpu.cpp",)),
}
_lock = threading.Lock()
_announced: set[tuple[str, str, str]] = set()
_HEADERS = tuple(sorted(p.name for p in _HERE.glob("*.h")))  # every header the sources may include, copied beside them


def _flags(device_type: str) -> dict[str, list[str]]:
    if device_type == "cuda":
        return {"extra_cuda_cflags": ["-O3"], "extra_cflags": ["-O3"]}
    return {"extra_cflags": _CPU_FLAGS, "extra_ldflags": ["-fopenmp"]}


def build_directory(device_type: str) -> Path:
    """Where the extension for ``device_type`` is built: a folder named by the hash of everything
    the build depends on (sources and headers, flags, torch, CUDA, Python)."""
    from torch.utils import cpp_extension

    build = _BUILDS[device_type]
    digest = hashlib.sha256()
    for name in (*build.sources, *_HEADERS):
        digest.update(name.encode() + b"\0" + (_HERE / name).read_bytes() + b"\0")
    digest.update(repr((_flags(device_type), torch.__version__, torch.version.cuda, sys.version)).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"{build.name}-{digest.hexdigest()[:16]}"


def _copy_sources(device_type: str, folder: Path) -> list[str]:
    """The sources and headers copied into ``folder/src`` (once: the folder is named by their
    hash), so that every checkout compiles the same paths and ninja finds nothing to redo."""
    src = folder / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in (*_BUILDS[device_type].sources, *_HEADERS):
        if not (src / name).is_file():
            fd, tmp = tempfile.mkstemp(dir=src, prefix=f".{name}.")
            os.close(fd)
            shutil.copyfile(_HERE / name, tmp)
            os.replace(tmp, src / name)  # concurrent builds each write the same bytes
    return [str(src / name) for name in _BUILDS[device_type].sources]


def _announce(device_type: str, folder: Path) -> None:
    """Say on stderr that a build starts (a minute of silence otherwise), unless it is done."""
    if any(folder.glob(f"{_BUILDS[device_type].name}*.so")):
        return
    what = "CUDA fake-quant kernels" if device_type == "cuda" else "CPU fake-quant kernel"
    print(f"hmqsearch: compiling the {what} once, about a minute, into {folder} "
          "(reused by later runs and by checkouts with the same sources)", file=sys.stderr, flush=True)


def kernels_disabled() -> bool:
    """True when HMQ_DISABLE_KERNELS is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(device_type: str) -> str:
    """Why the extension for ``device_type`` cannot be built here ('' when it can be tried)."""
    if device_type != "cuda":
        return ""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return ""


def _load(device_type: str) -> None:
    """Build or load the extension once per process, recording why when it is unavailable."""
    build = _BUILDS[device_type]
    with _lock:
        if build.loaded:
            return
        build.loaded = True
        build.failure = _unavailable(device_type)
        if build.failure:
            return
        from torch.utils import cpp_extension

        try:
            folder = build_directory(device_type)
            sources = _copy_sources(device_type, folder)
            _announce(device_type, folder)
            build.extension = cpp_extension.load(
                name=build.name, sources=sources, build_directory=str(folder), verbose=False, **_flags(device_type)
            )
        except Exception as exc:  # any build or import error means: use PyTorch
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            build.failure = f"building the {device_type.upper()} extension failed: {type(exc).__name__}: {first_line}"
            log.warning("%s; using the PyTorch implementation. Full error:\n%s", build.failure, exc)


def _resolve(device_type: str, dtype: torch.dtype = torch.float32) -> tuple[ModuleType | None, str]:
    """(extension or None, reason) for a device type and dtype, loading the extension on first need."""
    build = _BUILDS.get(device_type)
    if build is None:
        return None, f"no custom kernels for {device_type}, it uses PyTorch"
    if device_type == "cpu" and dtype != torch.float32:
        return None, f"the CPU kernel takes float32, {dtype} uses PyTorch"
    if kernels_disabled():
        return None, f"{DISABLE_ENV} is set"
    if not build.loaded:
        _load(device_type)
    if build.extension is None:
        return None, build.failure
    return build.extension, f"extension {build.name!r} built from {', '.join(build.sources)}"


def _label(device_type: str, ext: ModuleType | None) -> str:
    """The backend name: the extension's label, or 'pytorch' (also for devices without one)."""
    return _BUILDS[device_type].label if ext is not None else PYTORCH


def extension_for(device_type: str, dtype: torch.dtype = torch.float32) -> ModuleType | None:
    """The extension to run a call on ``device_type`` / ``dtype`` with, or None for PyTorch.

    The choice is logged once per distinct (device type, backend, reason).
    """
    ext, reason = _resolve(device_type, dtype)
    key = (device_type, _label(device_type, ext), reason)
    if key not in _announced:
        _announced.add(key)
        log.info("fake_quant on %s: %s (%s)", *key)
    return ext


def active_backend(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> str:
    """'cuda-kernels', 'cpu-kernels' or 'pytorch': what fake_quant runs on ``device`` for ``dtype``.

    ``device`` defaults to cuda when available, else cpu.  This builds or loads the
    extension if that was not done yet.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    ext, _ = _resolve(device_type, dtype)
    return _label(device_type, ext)


def build_kernels() -> tuple[list[str], bool]:
    """Build (or find built) every extension this machine can build (``hmqsearch build-kernels``):
    one line per device type saying where or why not, and whether a build failed."""
    lines, failed = [], False
    for device_type in ("cpu", "cuda"):
        ext, reason = _resolve(device_type)
        if ext is not None:
            lines.append(f"{device_type}: {_label(device_type, ext)} built in {build_directory(device_type)}")
        else:
            lines.append(f"{device_type}: not built ({reason})")
            failed = failed or _BUILDS[device_type].failure.startswith("building")
    return lines, failed


def backend_report() -> str:
    """One line per device type (cpu, cuda): the float32 backend and why.

    This builds or loads the extensions that can be built here, if that was not done yet.
    """
    lines = []
    for device_type in ("cpu", "cuda"):
        ext, reason = _resolve(device_type)
        lines.append(f"{device_type}: {_label(device_type, ext)} ({reason})")
    return "\n".join(lines)
