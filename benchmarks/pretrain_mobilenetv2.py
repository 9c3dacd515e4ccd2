"""Brief float pretraining of the CIFAR MobileNetV2 on CPU (no pretrained weights exist).

Writes ``<out>/mobilenetv2_w<width>.pt`` (a state_dict) and ``<out>/mobilenetv2_w<width>.json``
(the settings and the float test top-1 on the class-balanced test subset).  Example:

    python benchmarks/pretrain_mobilenetv2.py \
        --root ../shared/data/cifar10 --out runs/spiq --width 0.5 --train-subset 12000 --epochs 1
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from hmqsearch.data.cifar10 import CIFAR10DataModule
from hmqsearch.lit.classifier import ClassifierModule
from hmqsearch.lit.evaluate import evaluate
from hmqsearch.models.mobilenetv2_cifar import mobilenetv2_cifar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="CIFAR-10 folder (train.npz, test.npz)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the weights and the json")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--train-subset", type=int, default=12000)
    parser.add_argument("--test-subset", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed, workers=True)
    data = CIFAR10DataModule(args.root, batch_size=128, eval_batch_size=256, val_size=500, seed=args.seed,
                             train_subset=args.train_subset, test_subset=args.test_subset)
    data.setup("fit")
    net = mobilenetv2_cifar(width_mult=args.width)
    module = ClassifierModule(net, 10, functools.partial(torch.optim.Adam, weight_decay=1e-4), args.lr)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False)
    started = time.time()
    trainer.fit(module, datamodule=data)
    top1 = evaluate(net, data.test_dataloader(), 10)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mobilenetv2_w{args.width:g}"
    torch.save(net.state_dict(), f"{stem}.pt")
    record = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "float_top1": top1, "wall_s": time.time() - started}
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
