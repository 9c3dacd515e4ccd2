"""Check an exported ONNX graph against the PyTorch model it came from.

Two onnxruntime sessions run the graph: ``reference`` with graph optimizations off (the
graph's own semantics, which must reproduce the PyTorch fixed-state model up to float32
accumulation order) and ``runtime`` with every optimization on (what a deployment runs:
integer kernels, which round the float bias to int32; the one-step differences this causes
now and then propagate through the following layers, so the runtime agreement can be a few
percent lower on a model with small logit margins).  The export passes when the reference
agrees with PyTorch on at least ``min_agreement`` percent of the top-1 predictions and the
runtime on at least ``min_runtime_agreement`` percent.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from hmqsearch.errors import UserError
from hmqsearch.inputs import Inputs, batch_size, numpy_feed, run_model, take

log = logging.getLogger(__name__)

FAILED_SUFFIX = ".FAILED-verification.onnx"


class VerificationError(UserError):
    """The exported graph disagrees with the PyTorch model beyond the configured tolerance.

    ``result`` holds the verification figures; the graph was kept under a FAILED name.
    """

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session(path: str | Path, optimized: bool = True, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session; a missing, truncated or invalid file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the model's own warnings are not the user's business
    opts.intra_op_num_threads = threads
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), opts, providers=providers())
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX file {path} cannot be loaded by onnxruntime (corrupt or truncated?): {first}") from exc


def _batches(loader: Iterable[Any], max_samples: int | None) -> Iterable[tuple[Inputs, Tensor | None]]:
    seen = 0
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if max_samples is not None:
            x = take(x, max_samples - seen)
            y = None if y is None else y[: batch_size(x)]
        if batch_size(x) == 0:
            return
        seen += batch_size(x)
        yield x, y


def graph_feed(sess: ort.InferenceSession, x: Inputs, path: str | Path) -> dict[str, np.ndarray]:
    """The onnxruntime feed of inputs ``x`` (dtypes kept), for the inputs the graph has."""
    feed = numpy_feed(x)
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feed]
    if missing:
        raise UserError(f"ONNX file {path} takes inputs {names}; the data gives {sorted(feed)}")
    return {n: feed[n] for n in names}


@torch.no_grad()
def verify_onnx(
    onnx_path: str | Path,
    model: nn.Module,
    loader: Iterable[Any],
    min_agreement: float = 99.0,
    max_samples: int | None = 1000,
    min_runtime_agreement: float = 90.0,
) -> dict[str, Any]:
    """Compare the graph's logits with ``model``'s (a fixed-state QuantModel) on ``loader``.

    ``loader`` yields ``(inputs, labels)`` or bare inputs; inputs are a tensor, a tuple or a
    dict of tensors, fed to the graph with their dtypes (:mod:`hmqsearch.inputs`).  Returns agreement (% of samples
    with the same top-1), max / mean absolute logit difference, onnx and torch top-1 accuracy
    (None without labels) and the sample count, for the runtime session and, prefixed
    ``reference_``, for the unoptimized one; ``passed`` says whether the agreements reach
    their thresholds.  Prints one line per session.
    """
    was_training = model.training
    model.eval()
    sessions = {"runtime": session(onnx_path), "reference": session(onnx_path, optimized=False)}
    stats = {k: {"agree": 0, "max": 0.0, "sum": 0.0, "correct": 0} for k in sessions}
    n = elements = torch_correct = 0
    labelled = True
    try:
        for x, y in _batches(loader, max_samples):
            ref = run_model(model, x).float().cpu().numpy()
            feed = graph_feed(sessions["runtime"], x, onnx_path)
            for key, sess in sessions.items():
                out = _run(sess, feed, onnx_path)
                diff = np.abs(out.astype(np.float64) - ref)
                s = stats[key]
                s["agree"] += int((out.argmax(1) == ref.argmax(1)).sum())
                s["max"] = max(s["max"], float(diff.max()))
                s["sum"] += float(diff.sum())
                if y is not None:
                    s["correct"] += int((out.argmax(1) == y.numpy()).sum())
            if y is None:
                labelled = False
            else:
                torch_correct += int((ref.argmax(1) == y.numpy()).sum())
            n += batch_size(x)
            elements += ref.size
    finally:
        model.train(was_training)
    if n == 0:
        raise UserError(f"no samples to verify {onnx_path} on: the data loader is empty")
    result: dict[str, Any] = {"samples": n, "min_agreement": min_agreement, "min_runtime_agreement": min_runtime_agreement}
    for key, prefix in (("runtime", ""), ("reference", "reference_")):
        s = stats[key]
        result[f"{prefix}agreement"] = 100.0 * s["agree"] / n
        result[f"{prefix}max_abs_logit_diff"] = s["max"]
        result[f"{prefix}mean_abs_logit_diff"] = s["sum"] / elements
        result[f"{prefix}onnx_top1"] = 100.0 * s["correct"] / n if labelled else None
    result["torch_top1"] = 100.0 * torch_correct / n if labelled else None
    result["passed"] = (
        result["reference_agreement"] >= min_agreement and result["agreement"] >= min_runtime_agreement
    )
    _print(Path(onnx_path), result)
    return result


def _run(sess: ort.InferenceSession, feed: dict[str, np.ndarray], path: str | Path) -> np.ndarray:
    try:
        return sess.run(None, feed)[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        shapes = {k: v.shape for k, v in feed.items()}
        raise UserError(f"ONNX file {path} rejects inputs {shapes}: {str(exc).strip().splitlines()[0]}") from exc


def _print(path: Path, r: dict[str, Any]) -> None:
    top1 = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
    verdict = "ok" if r["passed"] else (
        f"FAILED (needs >= {r['min_agreement']:.2f}% reference and >= {r['min_runtime_agreement']:.2f}% runtime agreement)"
    )
    print(f"verify {path.name} on {r['samples']} samples: {verdict}")
    for label, prefix in (("runtime  ", ""), ("reference", "reference_")):
        print(
            f"  {label} agreement {r[prefix + 'agreement']:.2f}%  max |dlogit| {r[prefix + 'max_abs_logit_diff']:.3g}  "
            f"mean |dlogit| {r[prefix + 'mean_abs_logit_diff']:.3g}  top-1 onnx {top1(r[prefix + 'onnx_top1'])} "
            f"torch {top1(r['torch_top1'])}"
        )


def fail_export(onnx_path: str | Path, result: dict[str, Any]) -> Path:
    """Rename a graph that failed verification to ``<stem>.FAILED-verification.onnx`` and raise."""
    path = Path(onnx_path)
    failed = path.with_name(path.name.removesuffix(".onnx") + FAILED_SUFFIX)
    path.replace(failed)
    raise VerificationError(
        f"exported graph disagrees with the PyTorch model on {result['samples']} samples: top-1 agreement "
        f"{result['reference_agreement']:.2f}% as a graph (export.tolerance_agreement={result['min_agreement']}), "
        f"{result['agreement']:.2f}% with onnxruntime's integer kernels "
        f"(export.tolerance_runtime_agreement={result['min_runtime_agreement']}); kept as {failed} for inspection",
        {k: v for k, v in result.items() if k != "passed"},
    )


def random_loader(input_shape: tuple[int, ...], samples: int, batch: int = 64, seed: int = 0) -> list[Tensor]:
    """Standard-normal inputs: verification data when no data set is at hand."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(min(batch, samples - i), *input_shape, generator=g) for i in range(0, samples, batch)]


def first_batch(loader: Iterable[Any]) -> Inputs:
    batch = next(iter(itertools.islice(loader, 1)), None)
    if batch is None:
        raise UserError("the data loader is empty")
    return batch[0] if isinstance(batch, (tuple, list)) else batch
