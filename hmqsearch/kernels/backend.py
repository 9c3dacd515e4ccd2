"""Which implementation runs fake_quant: the CUDA extension or plain PyTorch, and why.

On the first CUDA call the extension (``binding.cpp`` + ``fake_quant.cu``) is built with
``torch.utils.cpp_extension.load`` into torch's default extensions directory, where later
processes reuse it.  No GPU, no CUDA toolkit, ``HMQ_DISABLE_KERNELS=1`` or a failed build
(logged as a warning) all select the PyTorch implementation instead; nothing raises.  The
choice per device type is logged once on the ``hmqsearch.kernels`` logger.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("hmqsearch.kernels")

DISABLE_ENV = "HMQ_DISABLE_KERNELS"
CUDA_KERNELS = "cuda-kernels"
PYTORCH = "pytorch"

_SOURCES = ("binding.cpp", "fake_quant.cu")
_EXTENSION_NAME = "hmqsearch_fake_quant"

_lock = threading.Lock()
_loaded = False  # a load was attempted (successfully or not)
_extension: ModuleType | None = None
_failure = ""  # why the extension is unavailable after a failed attempt
_announced: set[tuple[str, str, str]] = set()


def kernels_disabled() -> bool:
    """True when HMQ_DISABLE_KERNELS is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _load() -> None:
    """Build or load the extension once per process, recording why when it is unavailable."""
    global _loaded, _extension, _failure
    with _lock:
        if _loaded:
            return
        _loaded = True
        if not torch.cuda.is_available():
            _failure = "torch.cuda.is_available() is False"
            return
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            _failure = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
            return
        here = Path(__file__).resolve().parent
        try:
            _extension = cpp_extension.load(
                name=_EXTENSION_NAME,
                sources=[str(here / s) for s in _SOURCES],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3"],
                verbose=False,
            )
        except Exception as exc:  # any build or import error means: use PyTorch
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            _failure = f"building the CUDA extension failed: {type(exc).__name__}: {first_line}"
            log.warning("%s; using the PyTorch implementation. Full error:\n%s", _failure, exc)


def _resolve(device_type: str) -> tuple[ModuleType | None, str]:
    """(extension or None, reason) for a device type, loading the extension on first need."""
    if device_type != "cuda":
        return None, f"custom kernels are CUDA only, {device_type} uses PyTorch"
    if kernels_disabled():
        return None, f"{DISABLE_ENV} is set"
    if not _loaded:
        _load()
    if _extension is None:
        return None, _failure
    return _extension, f"extension {_EXTENSION_NAME!r} built from {', '.join(_SOURCES)}"


def extension_for(device_type: str) -> ModuleType | None:
    """The extension to run a call on ``device_type`` with, or None for PyTorch.

    The choice is logged once per distinct (device type, backend, reason).
    """
    ext, reason = _resolve(device_type)
    key = (device_type, CUDA_KERNELS if ext is not None else PYTORCH, reason)
    if key not in _announced:
        _announced.add(key)
        log.info("fake_quant on %s: %s (%s)", *key)
    return ext


def active_backend(device: torch.device | str | None = None) -> str:
    """'cuda-kernels' or 'pytorch': what fake_quant runs on ``device``.

    ``device`` defaults to cuda when available, else cpu.  For a CUDA device this builds or
    loads the extension if that was not done yet.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ext, _ = _resolve(torch.device(device).type)
    return CUDA_KERNELS if ext is not None else PYTORCH


def backend_report() -> str:
    """One line per device type (cpu, cuda): the active backend and why.

    On a machine with a GPU this builds or loads the extension if that was not done yet.
    """
    lines = []
    for device_type in ("cpu", "cuda"):
        ext, reason = _resolve(device_type)
        lines.append(f"{device_type}: {CUDA_KERNELS if ext is not None else PYTORCH} ({reason})")
    return "\n".join(lines)
