"""onnxruntime latency of CIFAR deployment graphs: float32, all-int8 and mixed precision.

    python benchmarks/export_latency.py [--model resnet20|mobilenetv2] [--threads 1] [--rounds 5]
        [--data ../shared/data] [--table latency_table.json]

Uses the CIFAR-10 test set and (ResNet-20) the pretrained weights from ``--data`` when
present (random weights and inputs otherwise; timing does not depend on them).  Every graph is timed
at batch 1 and 64 in interleaved rounds (the median of all runs is kept), so load from other
processes affects all graphs alike.  It also reports how many layers onnxruntime runs as
integer kernels (QLinearConv) and, with data, the graphs' top-1 and agreement with PyTorch.
With ``--table`` (written by ``hmqsearch profile`` for this model) it also prints the table's
prediction for each quantized graph beside the measurement at the table's batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmqsearch.cost.latency import LatencyTable, exact_total_latency  # noqa: E402
from hmqsearch.export.onnx_export import export_onnx  # noqa: E402
from hmqsearch.models.mobilenetv2_cifar import mobilenetv2_cifar  # noqa: E402
from hmqsearch.models.pretrained import load_pretrained  # noqa: E402
from hmqsearch.models.resnet_cifar import resnet20  # noqa: E402
from hmqsearch.quant.calibrate import calibrate_activations  # noqa: E402
from hmqsearch.quant.prepare import QuantModel, QuantSpec, prepare  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cifar_test(path: Path, n: int) -> tuple[torch.Tensor, np.ndarray] | None:
    if not path.is_file():
        return None
    data = np.load(path, allow_pickle=False)
    idx = np.random.default_rng(0).permutation(len(data["y"]))[:n]
    x = torch.from_numpy(data["x"][idx]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, data["y"][idx]


def quantized(net: torch.nn.Module, calib: torch.Tensor, bits: dict[str, tuple[int, int]]) -> QuantModel:
    """``net`` with ``bits[layer] = (weight, input)`` (default 8/8), widest-but-one weight thresholds."""
    qmodel = prepare(net, QuantSpec(weight_bits=[4, 8], act_bits=[4, 8], first_layer_act_bits=None), calib[:8])
    calibrate_activations(qmodel, [calib])
    for name, layer in qmodel.layers():
        wb, ab = bits.get(name, (8, 8))
        layer.wq.fix(layer.wq.scheme_at(wb, 1))
        layer.aq.fix(layer.aq.scheme_at(ab, 0))
    qmodel.set_state("fixed")
    return qmodel.eval()


def mixed_bits(qmodel: QuantModel) -> dict[str, tuple[int, int]]:
    """4-bit weights in the second half of the layers, 4-bit inputs to every third layer of the
    last third (the first and the last layer stay at 8 bits)."""
    names = [name for name, _ in qmodel.layers()]
    n = len(names)
    bits = {}
    for i, name in enumerate(names):
        wb = 4 if n // 2 <= i < n - 1 else 8
        ab = 4 if 2 * n // 3 <= i < n - 1 and i % 3 == 0 else 8
        bits[name] = (wb, ab)
    return bits


def session(path: Path, threads: int, optimized_path: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["resnet20", "mobilenetv2"], default="resnet20")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0 = all cores)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per graph, batch and round")
    parser.add_argument("--samples", type=int, default=1000, help="test images for top-1 / agreement")
    parser.add_argument("--data", type=Path, default=SHARED, help="shared data folder (cifar10/, weights/)")
    parser.add_argument("--table", type=Path, help="a measured latency table of this model to compare with")
    args = parser.parse_args()
    weights = args.data / "weights" / "resnet20-12fca82f.th"

    torch.manual_seed(0)
    net = resnet20() if args.model == "resnet20" else mobilenetv2_cifar()
    real = args.model == "resnet20" and weights.is_file()
    if real:
        load_pretrained(net, str(weights))
    data = cifar_test(args.data / "cifar10" / "test.npz", args.samples)
    calib = data[0][:256] if data is not None else torch.randn(256, 3, 32, 32)
    print(f"{args.model}, {'pretrained' if real else 'random'} weights, calibration on "
          f"{'CIFAR-10 test images' if data is not None else 'random inputs'}; onnxruntime {ort.__version__}, "
          f"{args.threads} thread(s)")

    int8 = quantized(net, calib, {})
    mixed = quantized(net, calib, mixed_bits(int8))
    int4 = quantized(net, calib, {name: (4, 8) for name in int8.layer_names})
    tmp = Path(tempfile.mkdtemp(prefix="hmq-bench-"))
    graphs = {
        "float32": (int8, export_onnx(int8, tmp / "float.onnx", calib, as_float=True)),
        "int8 W8A8": (int8, export_onnx(int8, tmp / "int8.onnx", calib)),
        "int8 W8A8 portable": (int8, export_onnx(int8, tmp / "int8_portable.onnx", calib, form="portable")),
        "mixed W4/8 A4/8": (mixed, export_onnx(mixed, tmp / "mixed.onnx", calib)),
        "int4 W4A8": (int4, export_onnx(int4, tmp / "int4.onnx", calib)),
    }
    sessions, kernels = {}, {}
    for name, (_, info) in graphs.items():
        opt = tmp / f"{info.path.stem}.opt.onnx"
        sessions[name] = session(info.path, args.threads, opt)
        ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
        kernels[name] = ops.get("QLinearConv", 0)

    times: dict[tuple[str, int], list[float]] = {(g, b): [] for g in graphs for b in (1, 64)}
    inputs = {b: np.random.default_rng(b).standard_normal((b, 3, 32, 32)).astype(np.float32) for b in (1, 64)}
    for _ in range(args.rounds):
        for batch in (1, 64):
            for name, sess in sessions.items():
                feed = {"input": inputs[batch]}
                sess.run(None, feed)  # warm-up
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    times[(name, batch)].append(1e3 * (time.perf_counter() - t0))
    med = {k: float(np.median(v)) for k, v in times.items()}

    accuracy = {}
    if data is not None:
        x, y = data
        for name, (qmodel, _) in graphs.items():
            out = np.concatenate([sessions[name].run(None, {"input": c.numpy()})[0] for c in x.split(250)])
            if name == "float32":
                accuracy[name] = (100 * (out.argmax(1) == y).mean(), None)
                continue
            with torch.no_grad():
                ref = qmodel(x).numpy()
            accuracy[name] = (100 * (out.argmax(1) == y).mean(), 100 * (out.argmax(1) == ref.argmax(1)).mean())

    base1, base64 = med[("float32", 1)], med[("float32", 64)]
    float_bytes = graphs["float32"][1].onnx_bytes
    head = (f"{'graph':<20} {'file KB':>8} {'/fp32':>6} {'weight KB':>9} {'QLinearConv':>11} "
            f"{'b1 ms':>8} {'b64 ms':>8} {'b1 x':>6} {'b64 x':>6}")
    if accuracy:
        head += f" {'top-1':>7} {'agree':>7}"
    print(head)
    print("-" * len(head))
    for name, (qmodel, info) in graphs.items():
        line = (
            f"{name:<20} {info.onnx_bytes / 1024:8.1f} {info.onnx_bytes / float_bytes:6.3f} {info.weight_bytes / 1024:9.1f} "
            f"{kernels[name]:>6}/{len(qmodel.layer_names):<4} "
            f"{med[(name, 1)]:8.3f} {med[(name, 64)]:8.2f} {base1 / med[(name, 1)]:6.2f} {base64 / med[(name, 64)]:6.2f}"
        )
        if accuracy:
            top1, agree = accuracy[name]
            line += f" {top1:6.2f}% " + ("      -" if agree is None else f"{agree:6.2f}%")
        print(line)
    if args.table is not None:
        table = LatencyTable.load(args.table)
        print(f"latency table {args.table} ({table.source}): prediction vs measurement at batch {table.batch}")
        for name, (qmodel, _) in graphs.items():
            if name != "float32" and table.batch in (1, 64):
                predicted = exact_total_latency(qmodel, table)
                measured = med[(name, table.batch)]
                print(f"  {name:<20} table {predicted:8.2f} ms  measured {measured:8.2f} ms  measured/table {measured / predicted:5.2f}")
    print("x = speed-up over float32 (median latency ratio); agree = top-1 agreement with the PyTorch fixed-state model;")
    print("/fp32 = file size over the float32 graph's; weight KB = the weight initializers (integer containers or float32)")


if __name__ == "__main__":
    main()
