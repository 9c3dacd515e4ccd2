"""Measured latency tables: each layer's deployed form timed in onnxruntime at every precision.

For every quantized layer and every candidate (weight bits, activation bits) the profiler
builds a one-layer ONNX graph exactly as the exporter writes that layer (input
Clip/QuantizeLinear/DequantizeLinear at ``ba`` bits, integer weights at ``bw`` bits, the
Conv/Gemm with its bias; 32 = float), and, when the layer's output feeds the next layer's
quantizer in the network (onnxruntime then runs it as an integer kernel), the 8-bit
QuantizeLinear of its output too.  Each graph is timed on the current device (CUDA execution
provider when onnxruntime has it, else the CPU) after a warm-up, and the median of the
repeats goes into a :class:`~hmqsearch.cost.latency.LatencyTable` (``source="measured:..."``)
that ``cost.latency=measured cost.latency_table=<file>`` reads back.

The per-layer sum leaves out what lies between layers (adds, pooling, layout changes) and
counts input quantize steps that chained integer kernels skip; the profiler therefore also
times the whole graph at a reference assignment (every layer at its highest candidate) and
stores the difference as the table's ``overhead_ms``, so that overhead + the sum of the
entries predicts the whole graph.  :func:`measure_graph_latency` of the exported graph is
reported beside the prediction.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from hmqsearch.cost.latency import FLOAT_BITS, LatencyTable, latency_bits
from hmqsearch.export.deployed import DeployedLayer, deployed_layers
from hmqsearch.export.onnx_export import (
    IR_VERSION, OPSET, build_graph, container_type, fusable_layers, layer_subgraph, trace_deployment,
)
from hmqsearch.errors import UserError
from hmqsearch.export.verify import graph_feed, providers, session
from hmqsearch.inputs import Inputs, apply, take
from hmqsearch.quant.prepare import QuantModel
from hmqsearch.quant.scheme import Scheme


def device_name() -> str:
    """The execution provider and processor the measurement ran on."""
    provider = providers()[0].removesuffix("ExecutionProvider")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"onnxruntime-{ort.__version__}/{provider}/{cpu}"


def unit_model(
    layer: DeployedLayer, input_shape: tuple[int, ...], batch: int, output_q: tuple[Scheme, str | None] | None
) -> onnx.ModelProto:
    """One layer as deployed, with its output quantized when ``output_q`` = (scheme, activation)."""
    fused = output_q is not None
    sub = layer_subgraph(layer, "x", "y", 1 + len(input_shape), "onnxruntime", fused)
    out, out_type = "y", TensorProto.FLOAT
    if output_q is not None:
        scheme, act = output_q
        if act == "Relu":
            out = sub.node("Relu", [out], "y_relu")
        step = float(scheme.steps[0])
        scale = sub.init(helper.make_tensor("y_scale", TensorProto.FLOAT, [], [step]))
        zp = sub.init(helper.make_tensor("y_zero_point", container_type(scheme), [], [0]))
        out = sub.node("QuantizeLinear", [out, scale, zp], "y_quantized")
        out_type = container_type(scheme)
    graph = helper.make_graph(
        sub.nodes, layer.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *input_shape])],
        [helper.make_tensor_value_info(out, out_type, None)],
        sub.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    return onnx.shape_inference.infer_shapes(model)


def time_session(sess: ort.InferenceSession, feed: dict[str, np.ndarray], warmup: int, repeats: int) -> float:
    """Median wall time of ``sess.run`` in milliseconds."""
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _session_from_model(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers())


def _structure(qmodel: QuantModel, example: torch.Tensor) -> dict[int, tuple[int, str | None]]:
    """Which layers feed the next layer's quantizer (evaluated with every tensor at 8 bits)."""
    traced, layers = trace_deployment(qmodel, [d.at_bits(8, 8) for d in deployed_layers(qmodel)], example)
    return fusable_layers(traced, layers)


def _output_quantizer(
    unit: DeployedLayer, consumer: tuple[int, str | None] | None, layers: list[DeployedLayer]
) -> tuple[Scheme, str | None] | None:
    """The consumer's quantizer at 8 bits when this precision lets onnxruntime fuse the layer."""
    if consumer is None or unit.wscheme is None or unit.ascheme is None or unit.ascheme.container_bits != 8:
        return None
    j, act = consumer
    nxt = layers[j].ascheme
    return None if nxt is None else (nxt.at_bits(8), act)


def profile_layers(
    qmodel: QuantModel,
    example: torch.Tensor,
    *,
    batch: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Time every layer at every candidate (bw, ba) and return the measured table (ms)."""
    layers = deployed_layers(qmodel)
    embeddings = [d.name for d in layers if d.kind == "embedding"]
    if embeddings:
        raise UserError(
            f"a measured latency table times Conv and Linear layers; this model has embeddings ({', '.join(embeddings[:3])}): "
            "use the analytic latency model (cost=analytic)"
        )
    structure = _structure(qmodel, example)
    rng = np.random.default_rng(0)
    w_bits: dict[str, list[int]] = {}
    a_bits: dict[str, list[int]] = {}
    ms: dict[str, list[list[float]]] = {}
    for index, ((name, qlayer), d) in enumerate(zip(qmodel.layers(), layers)):
        shape = qlayer.shape.input_shapes[0]
        feed = {"x": rng.standard_normal((batch, *shape)).astype(np.float32)}
        wb, ab = latency_bits(qlayer.wq), latency_bits(qlayer.aq)
        rows = []
        for bw in wb:
            row = []
            for ba in ab:
                unit = d.at_bits(None if bw == FLOAT_BITS else bw, None if ba == FLOAT_BITS else ba)
                out_q = _output_quantizer(unit, structure.get(index), layers)
                sess = _session_from_model(unit_model(unit, tuple(shape), batch, out_q), threads)
                row.append(time_session(sess, feed, warmup, repeats))
            rows.append(row)
        w_bits[name], a_bits[name], ms[name] = wb, ab, rows
        if progress is not None:
            progress(f"{name}: " + ", ".join(f"W{b}: {min(r):.3f}-{max(r):.3f} ms" for b, r in zip(wb, rows)))
    timing = dict(batch=batch, warmup=warmup, repeats=repeats, threads=threads)
    reference = [d.at_bits(_highest(w_bits[d.name]), _highest(a_bits[d.name])) for d in layers]
    whole = _graph_latency(build_graph(qmodel, reference, example).model, tuple(example.shape[1:]), **timing)
    source = f"measured:{device_name()} batch={batch} threads={threads}"
    table = LatencyTable(source, w_bits, a_bits, ms, batch=batch, threads=threads)
    layer_sum = sum(table.lookup(d.name, _highest(w_bits[d.name]), _highest(a_bits[d.name])) for d in layers)
    table.overhead_ms = whole - layer_sum
    if progress is not None:
        progress(f"whole graph at the highest candidates: {whole:.3f} ms; its layers' entries sum to {layer_sum:.3f} ms")
    return table


def _highest(bits: list[int]) -> int | None:
    """The highest candidate of a table row as :meth:`DeployedLayer.at_bits` takes it (None = float)."""
    return None if max(bits) == FLOAT_BITS else max(bits)


def _graph_latency(model: onnx.ModelProto, input_shape: tuple[int, ...], *, batch: int, warmup: int, repeats: int, threads: int) -> float:
    sess = _session_from_model(model, threads)
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)}
    return time_session(sess, feed, warmup, repeats)


def measure_graph_latency(
    onnx_path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    *,
    batch: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    threads: int = 1,
    example: Inputs | None = None,
) -> float:
    """Median latency (ms) of a whole exported graph at ``batch`` on the current device.

    Inputs: standard-normal float32 of ``input_shape`` per sample, or ``example``'s first sample
    repeated ``batch`` times (any input structure and dtypes, e.g. token ids).
    """
    sess = session(onnx_path, threads=threads)
    if example is not None:
        feed = graph_feed(sess, apply(take(example, 1), lambda t: t.expand(batch, *t.shape[1:])), onnx_path)
    elif input_shape is not None:
        feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)}
    else:
        raise ValueError("measure_graph_latency needs input_shape or example")
    return time_session(sess, feed, warmup, repeats)
