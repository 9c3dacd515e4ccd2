"""Dual variables as layer sensitivity on CIFAR-10 ResNet-20 at uniform 2-bit weights.

1. For each seed: ResNet-20 with every weight at 2 bits (per output channel) and every input at
   8 bits is fine-tuned with one proximity constraint per layer (primal-dual, as in the search);
   the final duals rank the layers (``sensitivity.md`` / ``.png`` per seed), and the Spearman
   rank correlation of the two seeds' duals is reported.
2. Layer-selective fine-tunes: keep the k layers with the largest mean dual at 8-bit weights and
   the rest at 2 bits, against keeping the k smallest, k in ``--ks``, same epochs and seed; plus
   the all-2-bit reference.

Example (the figures in docs/spiq_sensitivity.md):

    python benchmarks/layer_sensitivity.py --root ../shared/data/cifar10 \
        --weights ../shared/data/weights/resnet20-12fca82f.th --out runs/spiq/sensitivity \
        --train-subset 2560 --test-subset 1000 --epochs 1
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from hmqsearch.constrained.proximity import ProximityConstraints, ProximitySpec
from hmqsearch.data.cifar10 import CIFAR10DataModule
from hmqsearch.lit.classifier import ClassifierModule
from hmqsearch.lit.distill import Distiller
from hmqsearch.lit.evaluate import evaluate
from hmqsearch.lit.search import SearchModule
from hmqsearch.models.pretrained import load_pretrained
from hmqsearch.models.resnet_cifar import resnet20
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import QuantModel, QuantSpec, prepare
from hmqsearch.report.sensitivity import ranked, spearman, write_sensitivity_report

LOW, HIGH, ACT = 2, 8, 8


def float_net(args: argparse.Namespace) -> torch.nn.Module:
    net = resnet20()
    load_pretrained(net, args.weights)
    return net.eval()


def quantized(args: argparse.Namespace, data: CIFAR10DataModule, high: set[str]) -> QuantModel:
    """ResNet-20 with weights at 2 bits except the layers in ``high`` (8 bits), inputs at 8 bits."""
    net = float_net(args)
    calib = data.calibration_batches(2)
    qmodel = prepare(net, QuantSpec(weight_bits=[LOW, HIGH], act_bits=[ACT]), calib[0][:8])
    calibrate_activations(qmodel, calib, "max")
    for name, layer in qmodel.layers():
        bits = HIGH if name in high else LOW
        layer.wq.fix(layer.wq.scheme_at(bits))  # lowest-MSE threshold
        layer.aq.fix(layer.aq.scheme_at(ACT))
    qmodel.set_state("fixed")
    return qmodel


def trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                      gradient_clip_val=1.0,  # as the CIFAR-10 experiment: distilled low-bit fine-tunes can diverge
                      num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
                      enable_progress_bar=True)


def data_for(args: argparse.Namespace, seed: int) -> CIFAR10DataModule:
    data = CIFAR10DataModule(args.root, batch_size=128, eval_batch_size=250, val_size=500, seed=seed,
                             train_subset=args.train_subset, test_subset=args.test_subset)
    data.setup("fit")
    return data


def dual_ranking(args: argparse.Namespace, seed: int) -> dict[str, float]:
    pl.seed_everything(seed, workers=True)
    data = data_for(args, seed)
    qmodel = quantized(args, data, set())
    spec = ProximitySpec(enabled=True, tolerance=args.tolerance, relative=True, update="step", dual_lr=args.dual_lr)
    proximity = ProximityConstraints(qmodel, spec)
    module = SearchModule(qmodel, 10, functools.partial(torch.optim.Adam), args.lr, 0.0, [], 0.0,
                          proximity=proximity)
    trainer(args.epochs).fit(module, datamodule=data)
    proximity.remove()
    duals = proximity.duals.as_dict()
    write_sensitivity_report(duals, args.out / f"seed{seed}", f"ResNet-20, W2A8, seed {seed}")
    return duals


def finetuned_top1(args: argparse.Namespace, high: set[str], distiller: Distiller | None) -> float:
    pl.seed_everything(0, workers=True)
    data = data_for(args, 0)
    qmodel = quantized(args, data, high)
    for p in qmodel.logit_parameters():
        p.requires_grad_(False)
    optimizer = (functools.partial(torch.optim.SGD, momentum=0.9, weight_decay=1e-4) if args.optimizer == "sgd"
                 else functools.partial(torch.optim.Adam))
    module = ClassifierModule(qmodel, 10, optimizer, args.finetune_lr or args.lr, distiller)
    trainer(args.epochs).fit(module, datamodule=data)
    return evaluate(qmodel, data.test_dataloader(), 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--weights", required=True, help="pretrained ResNet-20")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 1))
    parser.add_argument("--ks", type=int, nargs="+", default=(1, 2, 4))
    parser.add_argument("--train-subset", type=int, default=2560)
    parser.add_argument("--test-subset", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="of the layer-selective fine-tunes")
    parser.add_argument("--finetune-lr", type=float, default=None, help="of the layer-selective fine-tunes (default: --lr)")
    parser.add_argument("--distill", action="store_true", help="distil the float model into the layer-selective fine-tunes")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative output MSE per layer")
    parser.add_argument("--dual-lr", type=float, default=0.01)
    args = parser.parse_args()
    started = time.time()

    duals = {seed: dual_ranking(args, seed) for seed in args.seeds}
    names = list(duals[args.seeds[0]])
    rho = spearman([duals[args.seeds[0]][n] for n in names], [duals[args.seeds[1]][n] for n in names])
    mean = {n: sum(d[n] for d in duals.values()) / len(duals) for n in names}
    order = [n for n, _ in ranked(mean)]

    distiller = Distiller(float_net(args), alpha=0.9, temperature=4.0) if args.distill else None
    rows = [("-", "none (all 2-bit)", finetuned_top1(args, set(), distiller), "", float("nan"))]
    for k in args.ks:
        top, bottom = order[:k], order[-k:]
        rows.append((k, ", ".join(top), finetuned_top1(args, set(top), distiller), ", ".join(bottom),
                     finetuned_top1(args, set(bottom), distiller)))

    recipe = f"{args.optimizer}, lr {args.finetune_lr or args.lr}" + (", distilled from the float model" if args.distill else "")
    lines = [
        f"ResNet-20, weights 2 bits (selected layers 8), inputs 8 bits; fine-tune {args.epochs} epoch(s) ({recipe}) on "
        f"{args.train_subset} training images; test top-1 on {args.test_subset} class-balanced test images.",
        f"Dual ranking: mean of seeds {args.seeds[0]} and {args.seeds[1]}; Spearman rank correlation of the "
        f"two seeds' duals: {rho:.3f}.",
        "",
        "| k | top-k layers at 8 bits | top-1 (%) | bottom-k layers at 8 bits | top-1 (%) | top beats bottom |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k, top, top1, bottom, bottom1 in rows:
        verdict = "" if k == "-" else ("yes" if top1 > bottom1 else "NO")
        lines.append(f"| {k} | {top} | {top1:.2f} | {bottom} | {'' if k == '-' else f'{bottom1:.2f}'} | {verdict} |")
    lines += ["", "Final duals (seed %d / seed %d):" % tuple(args.seeds), "",
              "| layer | " + " | ".join(f"seed {s}" for s in args.seeds) + " |", "| --- | --- | --- |"]
    lines += [f"| {n} | " + " | ".join(f"{duals[s][n]:.4g}" for s in args.seeds) + " |" for n in order]
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_selective.md").write_text(table)
    (args.out / "layer_selective.json").write_text(json.dumps(
        {"duals": duals, "spearman": rho, "rows": rows, "wall_s": time.time() - started,
         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    print(table)
    print(f"wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
