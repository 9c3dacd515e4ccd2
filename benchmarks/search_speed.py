"""Time one training step (forward + backward + optimizer) of the float model, of the HMQ
search and of the fine-tune, on the same batch, at every batch size asked for (128 and 512), in
one process, and print ms, images a second and the ratios vs float.

* float     the pretrained-architecture network with BN, SGD
* search    HMQ on weights and activations (Gumbel-Softmax, expected step), the Lagrangian of
            an 8x packed weight budget, Adam on weights and logits, then the dual ascent
* search+kd the same with the distillation loss of the CIFAR-10 recipe (a float teacher forward)
* finetune  the searched model with its assignment frozen (argmax schemes), SGD

Medians over --steps after --warmup steps (on a GPU each step ends with a synchronize).
Default: CIFAR ResNet-20, batches 128 and 512, CPU (``--device cuda`` for a GPU), random
data shaped like CIFAR-10 (the step time does not depend on the pixel values), batch norm kept
as in the CIFAR-10 recipe (``--fold-bn`` folds it into the convolutions, as
``search.fold_bn=true`` does). The fake-quant backend (compiled kernel or PyTorch) is printed;
``HMQ_DISABLE_KERNELS=1`` times the PyTorch one. ``--precision bf16-mixed`` runs the steps
under bf16 autocast (as ``trainer.precision=bf16-mixed``), ``--capture compile|cuda-graphs``
compiles the quantized model's forward as ``step_capture`` does (the float step stays eager).

``--recipe`` times a whole run instead: ``train.py`` with the overrides that follow it, in a
subprocess, and prints its wall time, the stage timings of its ``summary.json`` and its
test top-1.

    python benchmarks/search_speed.py                     # ResNet-20, batches 128 and 512
    python benchmarks/search_speed.py --batches 128       # one batch size
    python benchmarks/search_speed.py --profile 5         # plus a torch.profiler table of the search step
    python benchmarks/search_speed.py --device cuda --capture cuda-graphs --precision bf16-mixed
    python benchmarks/search_speed.py --recipe experiment=cifar10_resnet20 data.root=../shared/data/cifar10 \
        model.pretrained=../shared/data/weights/resnet20-12fca82f.th search.epochs=30 finetune.epochs=20
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmqsearch.constrained.budgets import BudgetSpec, build_constraints  # noqa: E402
from hmqsearch.constrained.dual import DualVariables  # noqa: E402
from hmqsearch.kernels import active_backend  # noqa: E402
from hmqsearch.lit.capture import CAPTURE_MODES  # noqa: E402
from hmqsearch.lit.distill import Distiller  # noqa: E402
from hmqsearch.models import resnet_cifar  # noqa: E402
from hmqsearch.quant.calibrate import calibrate_activations  # noqa: E402
from hmqsearch.quant.prepare import QuantSpec, prepare  # noqa: E402


def median_seconds(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed")


def make_steps(depth: int, batch: int, fold_bn: bool = False, device: torch.device = torch.device("cpu"),
               precision: str = "32-true", capture: str = "none") -> dict[str, Callable[[], None]]:
    """The training steps, each on the same fixed batch."""
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16-mixed" else (
        contextlib.nullcontext)
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    net = getattr(resnet_cifar, f"resnet{depth}")(num_classes=10).train().to(device)
    float_opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def float_step() -> None:
        float_opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        float_opt.step()

    spec = QuantSpec(weight_bits=[2, 3, 4, 5, 6, 7, 8], act_bits=[4, 8], fold_bn=fold_bn)
    qmodel = prepare(net, spec, x[:8]).to(device)
    calibrate_activations(qmodel, [x])
    constraints = build_constraints(qmodel, BudgetSpec(weight_compression=8), None)
    duals = DualVariables([c.name for c in constraints], lr=0.05).to(device)
    qmodel.set_state("search")
    qmodel.set_tau(1.0)
    qmodel.train()
    search_opt = torch.optim.Adam([
        {"params": qmodel.weight_parameters(), "lr": 1e-5},
        {"params": qmodel.logit_parameters(), "lr": 0.02},
    ])

    distiller = Distiller(copy.deepcopy(net), alpha=0.9, temperature=4.0)
    forward = qmodel if capture == "none" else torch.compile(
        qmodel, mode={"compile": "default", "cuda-graphs": "reduce-overhead"}[capture])

    def quantized_logits() -> torch.Tensor:
        if capture == "cuda-graphs":
            torch.compiler.cudagraph_mark_step_begin()
        return forward(x)

    def search_step(distill: bool = False) -> None:
        search_opt.zero_grad(set_to_none=True)
        v = torch.stack([c.violation() for c in constraints])
        with autocast():
            logits = quantized_logits()
            task = distiller.loss(logits, x, y) if distill else F.cross_entropy(logits, y)
        (task + duals.lagrangian_term(v)).backward()
        search_opt.step()
        duals.ascend(v.detach())

    fine_opt = torch.optim.SGD(qmodel.weight_parameters(), lr=1e-3, momentum=0.9)

    def finetune_step() -> None:
        if qmodel.net.conv1.wq.state != "fixed":  # switch once, after the search timings
            qmodel.set_state("fixed")
            for p in qmodel.logit_parameters():
                p.requires_grad_(False)
        fine_opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(quantized_logits(), y)
        loss.backward()
        fine_opt.step()

    return {"float": float_step, "search": search_step, "search+kd": lambda: search_step(distill=True),
            "finetune": finetune_step}


def run_recipe(overrides: list[str]) -> None:
    """``train.py`` with ``overrides`` in a subprocess: wall time, stage timings, test top-1."""
    with tempfile.TemporaryDirectory(prefix="hmq_recipe_") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "logger=csv", "callbacks.progress_bar=false",
               f"hydra.run.dir={run_dir}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"recipe failed with exit status {proc.returncode} after {wall:.0f} s: {' '.join(cmd)}")
        summary = json.loads((run_dir / "summary.json").read_text())
    table = Table(title=f"Whole recipe: {' '.join(overrides)}")
    table.add_column("what")
    table.add_column("s / %", justify="right")
    table.add_row("wall time (process, s)", f"{wall:.1f}")
    for name, seconds in summary["timings"].items():
        table.add_row(f"summary timings.{name}", f"{seconds:.1f}")
    table.add_row("test top-1 float / quantized (%)", f"{summary['float_top1']:.2f} / {summary['quant_top1']:.2f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20, choices=(20, 32, 44, 56))
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", type=int, default=0, help="profile this many search steps (torch.profiler)")
    parser.add_argument("--fold-bn", action="store_true", help="fold batch norm into the convolutions")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--capture", choices=CAPTURE_MODES, default="none",
                        help="compile the quantized model's forward (search and fine-tune steps)")
    parser.add_argument("--json", type=Path, help="also write the timings here")
    parser.add_argument("--recipe", nargs=argparse.REMAINDER,
                        help="time a whole train.py run with the overrides that follow instead")
    args = parser.parse_args()
    if args.recipe is not None:
        run_recipe(args.recipe)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.capture == "cuda-graphs" and args.device != "cuda":
        parser.error("--capture cuda-graphs needs --device cuda")
    device = torch.device(args.device)

    times: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        steps = make_steps(args.depth, batch, args.fold_bn, device, args.precision, args.capture)
        times[batch] = {name: median_seconds(step, args.warmup, args.steps, device) for name, step in steps.items()}

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"Training step, ResNet-{args.depth}, {where}, median of {args.steps} after {args.warmup} "
                        f"warm-up, batch norm {'folded' if args.fold_bn else 'kept'}, "
                        f"fake_quant: {active_backend(device)}, {args.precision}, capture: {args.capture}")
    for col in ("batch", "step", "ms", "images/s", "x float"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for batch, row in times.items():
        for name, seconds in row.items():
            table.add_row(str(batch), name, f"{1000 * seconds:.1f}", f"{batch / seconds:,.0f}",
                          f"{seconds / row['float']:.2f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({
            "device": where, "precision": args.precision, "capture": args.capture,
            "backend": active_backend(device),
            "ms": {str(b): {k: 1000 * v for k, v in row.items()} for b, row in times.items()},
        }, indent=1))

    if args.profile:
        steps = make_steps(args.depth, args.batches[0], args.fold_bn, device, args.precision, args.capture)
        with torch.profiler.profile() as prof:
            for _ in range(args.profile):
                steps["search"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
