"""``hmqsearch export | verify | profile | build-kernels``: the deployment tools on the command line.

Exit status: 0 success, 1 an exported graph failed verification, 2 a user mistake (missing,
corrupt or truncated file, wrong format, bad option), reported as one message without a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from hmqsearch.errors import UserError

PROG = "hmqsearch"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

EPILOG = """exit status: 0 ok, 1 verification failed, 2 bad input (one message, no traceback)

examples:
  hmqsearch export --run-dir outputs/2024-01-01/12-00-00
  hmqsearch export --packed run/model.packed.safetensors --out deploy/
  hmqsearch verify run/model.onnx --packed run/model.packed.safetensors --samples 512
  hmqsearch profile --out table.json model=resnet20 data=cifar10 search.weight_bits=[4,8]
  hmqsearch build-kernels
"""


# ------------------------------------------------------------------------------- helpers
def _export_cfg(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = dict(base or {})
    for key, value in (
        ("form", args.form), ("tolerance_agreement", args.tolerance), ("verify_samples", args.samples),
        ("tolerance_runtime_agreement", args.runtime_tolerance),
        ("latency_batch", args.batch), ("latency_threads", args.threads),
    ):
        if value is not None:
            cfg[key] = value
    return cfg


# ------------------------------------------------------------------------------ commands
def cmd_export(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from hmqsearch.export.deploy import export_quantized
    from hmqsearch.export.packed import float_input_shape, load_packed, read_packed_meta
    from hmqsearch.export.verify import first_batch, random_loader
    from hmqsearch.quant.prepare import Pin, QuantSpec
    from hmqsearch.run.budget_check import check_budgets
    from hmqsearch.run.load import PRECISION, load_run

    if (args.run_dir is None) == (args.packed is None):
        raise UserError("export needs exactly one of --run-dir (a finished run) or --packed (a packed checkpoint)")
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
        run = load_run(run_dir)
        check_budgets(run.qmodel, run.cfg, str(run_dir / PRECISION), args.allow_over_budget)
        qmodel, loader, arch, spec = run.qmodel, run.datamodule.test_dataloader(), run.arch, run.spec
        base = OmegaConf.to_container(run.cfg.export, resolve=True) if run.cfg.get("export") else {}
        out = Path(args.out) if args.out else run_dir
    else:
        meta = read_packed_meta(args.packed)
        qmodel = load_packed(args.packed)
        spec_d = dict(meta["quant_spec"])
        spec = QuantSpec(**{**spec_d, "pins": [Pin(**p) for p in spec_d.get("pins", [])]})
        arch, base = meta["architecture"], {}
        loader = random_loader(float_input_shape(meta), args.samples or 256)
        out = Path(args.out) if args.out else Path(args.packed).parent
    figures = export_quantized(
        qmodel, out, first_batch(loader), loader, _export_cfg(args, base), arch=arch, spec=spec
    )["export"]
    print(
        f"wrote {out / figures['onnx_path']} ({figures['onnx_bytes']} bytes) and {out / figures['packed_path']} "
        f"({figures['packed_bytes']} weight bytes); {figures['measured_latency_ms']:.3f} ms at batch "
        f"{figures['measured_latency_batch']}"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from hmqsearch.export.deploy import DEFAULTS
    from hmqsearch.export.packed import float_input_shape, load_packed, read_packed_meta
    from hmqsearch.export.verify import random_loader, session, verify_onnx
    from hmqsearch.run.load import PRECISION, build_datamodule, read_run_config

    session(args.onnx)  # a clear message for a missing or broken graph before anything else
    meta = read_packed_meta(args.packed)
    qmodel = load_packed(args.packed)
    samples = args.samples or (1000 if args.data_from else 256)
    if args.data_from is not None:
        _, cfg = read_run_config(Path(args.data_from) / PRECISION)
        loader = build_datamodule(cfg).test_dataloader()
    else:
        loader = random_loader(float_input_shape(meta), samples)
    tolerance = args.tolerance if args.tolerance is not None else DEFAULTS["tolerance_agreement"]
    runtime = args.runtime_tolerance if args.runtime_tolerance is not None else DEFAULTS["tolerance_runtime_agreement"]
    result = verify_onnx(args.onnx, qmodel, loader, tolerance, samples, runtime)
    return 0 if result["passed"] else 1


def cmd_profile(args: argparse.Namespace) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    import hmqsearch.config_schema  # noqa: F401 - registers the schema conf/train.yaml composes onto
    from hmqsearch.export.profiler import profile_layers
    from hmqsearch.quant.calibrate import calibrate_activations
    from hmqsearch.quant.prepare import prepare
    from hmqsearch.run.config import quant_spec

    conf_dir = Path(args.config_dir).resolve()
    if not (conf_dir / "train.yaml").is_file():
        raise UserError(f"config directory {conf_dir} has no train.yaml; pass --config-dir")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("train", overrides=list(args.overrides))
        shape = tuple(args.input_shape) if args.input_shape else getattr(get_class(cfg.data._target_), "input_shape", None)
        net = instantiate(cfg.model.net)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"config: {str(exc).splitlines()[0]}") from exc
    if not shape:
        raise UserError(f"{cfg.data._target_} has no fixed input shape; pass --input-shape C H W")
    spec = quant_spec(cfg)
    example = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    qmodel = prepare(net, spec, example)
    calibrate_activations(qmodel, [example])  # signedness (unsigned after ReLU) decides the kernels
    qmodel.set_state("fixed")
    table = profile_layers(
        qmodel, example, batch=args.batch or 1, warmup=args.warmup, repeats=args.repeats,
        threads=args.threads if args.threads is not None else 1, progress=print,
    )
    table.save(args.out)
    print(f"wrote {args.out} ({table.source}, {len(table.ms)} layers, {OmegaConf.select(cfg, 'model.net._target_')})")
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from hmqsearch.kernels.backend import build_kernels

    lines, failed = build_kernels()
    print("\n".join(lines))
    return 1 if failed else 0


# ------------------------------------------------------------------------------- parsing
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tolerance", type=float, help="minimum top-1 agreement of the graph in percent (export.tolerance_agreement, default 99.5)")
    p.add_argument("--runtime-tolerance", type=float, help="the same for onnxruntime's integer kernels (export.tolerance_runtime_agreement, default 99.5)")
    p.add_argument("--samples", type=int, help="samples to verify on (export.verify_samples)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Deployment tools of hmqsearch: ONNX export, verification, latency profiling.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{export,verify,profile,build-kernels}")

    p = sub.add_parser("export", help="write model.onnx + model.packed.* from a run or a packed checkpoint",
                       description="Export the ONNX deployment graph and the packed checkpoint, verify the graph "
                       "against PyTorch and measure its latency.")
    p.add_argument("--run-dir", help="a finished run: precision.yaml + quantized_state.pt (verifies on its test set)")
    p.add_argument("--packed", help="a packed checkpoint (verifies on random inputs)")
    p.add_argument("--out", help="output directory (default: beside the input)")
    p.add_argument("--form", choices=["onnxruntime", "portable"], help="graph form (export.form)")
    p.add_argument("--batch", type=int, help="batch size of the latency measurement (export.latency_batch)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads for timing (0 = all)")
    p.add_argument("--allow-over-budget", action="store_true",
                   help="export a run whose (edited) precision.yaml breaks the run's budgets")
    _common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="check an ONNX graph against a packed checkpoint",
                       description="Run the graph in onnxruntime and the packed checkpoint in PyTorch on the same "
                       "inputs; report top-1 agreement and logit differences.")
    p.add_argument("onnx", help="the ONNX file")
    p.add_argument("--packed", required=True, help="the packed checkpoint (.safetensors or .json)")
    p.add_argument("--data-from", help="a run directory whose test set to use (default: random inputs)")
    _common(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("profile", help="write a measured latency table for a model config",
                       description="Time every layer's deployed form at every candidate precision in onnxruntime "
                       "and write the table for cost.latency=measured cost.latency_table=<file>.")
    p.add_argument("--out", required=True, help="the latency table (JSON) to write")
    p.add_argument("--config-dir", default=str(CONF_DIR), help="Hydra config directory (default: the project's conf/)")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="N", help="one sample's shape, e.g. 3 32 32")
    p.add_argument("--batch", type=int, help="batch size (default 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per entry (default 5)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per entry; the median is kept (default 20)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default 1, 0 = all)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet20 data=cifar10")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("build-kernels", help="compile the fake-quant kernels ahead of the first run",
                       description="Compile the CPU (and, with a GPU and the CUDA toolkit, the CUDA) fake-quant "
                       "extension into the shared build folder that runs and other checkouts reuse.")
    p.set_defaults(func=cmd_build_kernels)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from hmqsearch.export.verify import VerificationError

    try:
        return args.func(args)
    except VerificationError as exc:
        print(f"{PROG}: verification failed: {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
