"""Forward+backward time of hmqsearch's fake_quant against torch.fake_quantize_* and a copy.

For float32 tensors of 1 MB to 512 MB (shape [channels, n]), per tensor and per channel
(axis 0), with an int8 power-of-two grid (step 2^-4, lo = -128 step, hi = 127 step, what
torch.fake_quantize_per_*_affine computes with that scale, zero point 0 and [-128, 127]):

* ``hmq cuda kernels`` / ``hmq cpu kernels``  the fused extension of the device, when it builds
* ``hmq pytorch``       the plain PyTorch implementation (HMQ_DISABLE_KERNELS=1)
* ``torch.fake_quantize`` torch.fake_quantize_per_tensor_affine / _per_channel_affine

Each timing is fwd + bwd through torch.autograd.grad (grads of x, and of step/lo/hi for
hmq; torch's op has no parameter gradients), median of --repeats, CUDA events on GPU.
Bandwidth counts the minimum traffic of fwd+bwd, 5 x 4 bytes per element (read x, write
out; read x and grad, write grad_x), against a same-device tensor copy (2 x 4 bytes per
element, the "copy" rows) timed in the same run.

    python benchmarks/kernels.py                  # GPU if there is one, up to 512 MB
    python benchmarks/kernels.py --device cpu --max-mb 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# Runs from a checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmqsearch.kernels import active_backend, backend_report, fake_quant  # noqa: E402

KERNELS = {"cuda-kernels": "hmq cuda kernels", "cpu-kernels": "hmq cpu kernels"}
PYTORCH = "hmq pytorch"
TORCH_FQ, COPY = "torch.fake_quantize", "copy"
QMIN, QMAX, STEP = -128, 127, 2.0**-4


@dataclass
class Row:
    mb: int
    granularity: str
    method: str
    ms: float
    gbps: float
    copy_gbps: float
    same_output: bool | None = None


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def methods(x: Tensor, grad: Tensor, per_channel: bool) -> dict[str, Callable[[], Tensor]]:
    """name -> closure running fwd+bwd and returning the forward output."""
    n = (x.shape[0],) if per_channel else ()
    axis = 0 if per_channel else None
    step = torch.full(n, STEP, device=x.device, requires_grad=True)
    lo = torch.full(n, QMIN * STEP, device=x.device, requires_grad=True)
    hi = torch.full(n, QMAX * STEP, device=x.device, requires_grad=True)
    scale = torch.full(n, STEP, device=x.device)
    zero_point = torch.zeros(n, device=x.device, dtype=torch.int32)

    def hmq() -> Tensor:
        out = fake_quant(x, step, lo, hi, axis)
        torch.autograd.grad(out, (x, step, lo, hi), grad)
        return out

    def torch_fq() -> Tensor:
        if per_channel:
            out = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, QMIN, QMAX)
        else:
            out = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, QMIN, QMAX)
        torch.autograd.grad(out, (x,), grad)
        return out

    def pytorch() -> Tensor:
        previous = os.environ.get("HMQ_DISABLE_KERNELS")
        os.environ["HMQ_DISABLE_KERNELS"] = "1"
        try:
            return hmq()
        finally:
            if previous is None:
                del os.environ["HMQ_DISABLE_KERNELS"]
            else:
                os.environ["HMQ_DISABLE_KERNELS"] = previous

    found: dict[str, Callable[[], Tensor]] = {}
    compiled = active_backend(x.device)
    if compiled in KERNELS:
        found[KERNELS[compiled]] = hmq
    found[PYTORCH] = pytorch
    found[TORCH_FQ] = torch_fq
    return found


def bench(args: argparse.Namespace, device: torch.device) -> list[Row]:
    rows: list[Row] = []
    mb = args.min_mb
    while mb <= args.max_mb:
        numel = mb * 2**20 // 4
        x = (torch.randn(args.channels, numel // args.channels, device=device) * 4).requires_grad_()
        grad = torch.randn_like(x)
        elems = x.numel()
        dst = torch.empty_like(x)
        copy_s = timed(lambda: dst.copy_(x.detach()), device, args.warmup, args.repeats)
        copy_gbps = 2 * 4 * elems / copy_s / 1e9
        rows.append(Row(mb, "-", COPY, copy_s * 1e3, copy_gbps, copy_gbps))
        for granularity in ("per-tensor", "per-channel"):
            fns = methods(x, grad, granularity == "per-channel")
            outputs = {name: fn().detach() for name, fn in fns.items()}
            for name, fn in fns.items():
                seconds = timed(fn, device, args.warmup, args.repeats)
                same = None if name == PYTORCH else torch.equal(outputs[name], outputs[PYTORCH])
                rows.append(Row(mb, granularity, name, seconds * 1e3, 5 * 4 * elems / seconds / 1e9,
                                copy_gbps, same))
            del fns, outputs
        del x, grad, dst
        mb *= 2
    return rows


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells, with each method's speed-up over hmq pytorch and torch.fake_quantize."""
    ms = {(r.mb, r.granularity, r.method): r.ms for r in rows}

    def speedup(r: Row, over: str) -> str:
        t = ms.get((r.mb, r.granularity, over))
        return "-" if t is None or r.method in (over, COPY) else f"{t / r.ms:.2f}"

    header = ["MB", "granularity", "method", "fwd+bwd ms", "GB/s", "% of copy",
              "speed-up vs hmq pytorch", "speed-up vs torch.fq", "same output"]
    cells = []
    for r in rows:
        same = "-" if r.same_output is None else ("yes" if r.same_output else "NO")
        cells.append([str(r.mb), r.granularity, r.method, f"{r.ms:.3f}", f"{r.gbps:.1f}",
                      f"{100 * r.gbps / r.copy_gbps:.0f}%", speedup(r, PYTORCH),
                      speedup(r, TORCH_FQ), same])
    return header, cells


def show(title: str, header: list[str], cells: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
        print(title)
        for line in [header, *cells]:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        return
    t = Table(title=title)
    for h in header:
        t.add_column(h, justify="left" if h in ("granularity", "method") else "right")
    for c in cells:
        t.add_row(*c)
    Console(width=max(Console().width, 150)).print(t)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cuda", "cpu"), default=default_device)
    parser.add_argument("--min-mb", type=int, default=1, help="smallest tensor, MB (default 1)")
    parser.add_argument("--max-mb", type=int, help="largest tensor, MB (default 512 cuda, 64 cpu)")
    parser.add_argument("--channels", type=int, default=256, help="rows of the [channels, n] input")
    parser.add_argument("--repeats", type=int, help="timed runs (default 20 cuda, 5 cpu)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    args.max_mb = args.max_mb or (512 if device.type == "cuda" else 64)
    args.repeats = args.repeats or (20 if device.type == "cuda" else 5)
    if args.min_mb < 1 or args.max_mb < args.min_mb:
        parser.error("need 1 <= --min-mb <= --max-mb")

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}\n{backend_report()}\n")
    header, cells = table(bench(args, device))
    show(f"fake_quant fwd+bwd, float32, int8 grid, median of {args.repeats}", header, cells)


if __name__ == "__main__":
    main()
