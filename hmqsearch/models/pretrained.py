"""Trained weights from a local file or an http(s) URL, verified and matched to the model exactly."""

from __future__ import annotations

import hashlib
import pickle
import re
import urllib.error
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from hmqsearch.errors import UserError

# torch.hub's naming convention, also akamaster's: "<name>-<start of the sha256>.<ext>".
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")
_SHOWN = 5  # keys listed per kind of mismatch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str) -> Path:
    """The file behind ``url`` in the torch hub cache, downloaded once."""
    name = Path(urlparse(url).path).name
    if not name:
        raise UserError(f"pretrained URL {url} does not end in a file name")
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise UserError(f"cannot download pretrained weights {url}: {exc}") from exc
    return path


def _verify(path: Path, sha256: str | None, downloaded: bool) -> None:
    match = _HASH_IN_NAME.search(path.name)
    expected = (sha256 or (match.group(1) if match else "")).lower()
    if not expected:
        return
    actual = _sha256(path)
    if not actual.startswith(expected):
        origin = "given sha256" if sha256 else f"the '-{expected}.' in its name (the start of its sha256)"
        if downloaded:
            path.unlink()  # so that the next run downloads it again
        raise UserError(
            f"pretrained weights {path} have sha256 {actual}, which does not match {origin}"
            + ("; the download was removed" if downloaded else "")
        )


def _unreadable(path: Path, exc: Exception) -> UserError:
    """Why ``torch.load`` (weights only) could not read ``path``, in our words: torch's own text
    advises loading with ``weights_only=False``, which would run any code the file holds."""
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found:
            reason = f"it holds a Python object ({found.group(1)}) besides tensors and plain containers"
        elif isinstance(exc, pickle.UnpicklingError):
            reason = "it is a pickle, but not of tensors and plain containers, or it is damaged"
        else:
            reason = "the torch.save file is damaged or truncated"
    else:
        reason = f"this is not a file written by torch.save (it starts with {head!r})"
    return UserError(
        f"cannot read pretrained weights {path}: {reason}; allowed: a state_dict (tensor names to "
        f"tensors, or a dict holding one under 'state_dict') saved with torch.save"
    )


def _describe(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_pretrained(model: nn.Module, source: str, sha256: str | None = None) -> dict[str, Any]:
    """Load ``source`` (a path or an http(s) URL) into ``model`` and return the file's other
    entries (e.g. ``best_prec1``).

    The file is a state_dict or a dict holding one under ``state_dict``; a ``module.`` prefix
    (DataParallel) is stripped. Key names and shapes must match the model exactly; batch-norm
    ``num_batches_tracked`` counters may be absent. ``sha256`` (or a prefix of it) defaults to
    the hex in a ``-<hex>.`` file name.
    """
    downloaded = source.startswith(("http://", "https://"))
    path = _download(source) if downloaded else Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"pretrained weights {path} not found")
    _verify(path, sha256, downloaded)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means an unusable file
        raise _unreadable(path, exc) from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        state, meta = loaded["state_dict"], {k: v for k, v in loaded.items() if k != "state_dict"}
    else:
        state, meta = loaded, {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state_dict (a dict of tensor names to tensors)")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state.items() if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label}: {_describe(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise UserError(f"pretrained weights {path} do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict({**expected, **state})
    return meta
