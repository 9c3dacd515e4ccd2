"""Measured latency tables: every candidate timed, loadable through cost.latency=measured."""

from __future__ import annotations

import math

import torch

from hmqsearch.cost.latency import FLOAT_BITS, LatencyTable, build_latency_table, exact_latency, expected_latency
from hmqsearch.export.onnx_export import export_onnx
from hmqsearch.export.profiler import measure_graph_latency, profile_layers
from hmqsearch.models.small_cnn import SmallCNN
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import Pin, QuantSpec, prepare


def _qmodel():
    torch.manual_seed(0)
    spec = QuantSpec(weight_bits=[4, 8], act_bits=[4, 8], pins=[Pin("linear", weight_bits="float", act_bits="float")])
    x = torch.randn(16, 1, 8, 8)
    qmodel = prepare(SmallCNN(), spec, x[:8])
    calibrate_activations(qmodel, [x])
    qmodel.set_state("fixed")
    return qmodel, x


def test_profiler_table_covers_every_candidate_and_loads(tmp_path):
    qmodel, x = _qmodel()
    lines: list[str] = []
    table = profile_layers(qmodel, x, warmup=1, repeats=2, progress=lines.append)
    assert table.source.startswith("measured:onnxruntime")
    path = tmp_path / "table.json"
    table.save(path)
    loaded = build_latency_table(qmodel, "measured", None, str(path))
    assert isinstance(loaded, LatencyTable) and loaded.source == table.source
    for name, layer in qmodel.layers():
        wb = [FLOAT_BITS] if layer.wq.float_pinned else [int(b) for b in layer.wq.bits.tolist()]
        ab = [FLOAT_BITS] if layer.aq.float_pinned else [int(b) for b in layer.aq.bits.tolist()]
        assert loaded.w_bits[name] == wb and loaded.a_bits[name] == ab
        assert len(loaded.ms[name]) == len(wb) and all(len(row) == len(ab) for row in loaded.ms[name])
        assert all(v > 0 and math.isfinite(v) for row in loaded.ms[name] for v in row)
    assert loaded.w_bits["linear"] == [FLOAT_BITS]
    assert float(expected_latency(qmodel, loaded).detach()) > 0
    assert sum(exact_latency(qmodel, loaded).values()) > 0
    # the whole graph's cost beyond its layers is measured and travels with the table
    assert (loaded.overhead_ms, loaded.batch, loaded.threads) == (table.overhead_ms, 1, 1)
    assert math.isfinite(loaded.overhead_ms) and "whole graph" in lines[-1]
    assert len(lines) == len(qmodel.layer_names) + 1


def test_whole_graph_latency(tmp_path):
    qmodel, x = _qmodel()
    path = export_onnx(qmodel, tmp_path / "m.onnx", x).path
    for batch in (1, 4):
        assert measure_graph_latency(path, (1, 8, 8), batch=batch, warmup=1, repeats=3) > 0


def test_export_times_at_the_tables_batch_and_reports_its_prediction(tmp_path):
    from hmqsearch.cost.latency import exact_total_latency
    from hmqsearch.export.deploy import export_quantized

    qmodel, x = _qmodel()
    table = profile_layers(qmodel, x, batch=4, warmup=1, repeats=2)
    loader = [(x, torch.randint(0, 10, (len(x),)))]
    figures = export_quantized(
        qmodel, tmp_path, x, loader, {"latency_repeats": 3, "latency_warmup": 1, "compare_float": False},
        arch={"_target_": "hmqsearch.models.small_cnn.SmallCNN"}, spec=QuantSpec(weight_bits=[4, 8], act_bits=[4, 8]),
        latency_table=table,
    )["export"]
    assert figures["measured_latency_batch"] == 4
    assert figures["table_latency_ms"] == exact_total_latency(qmodel, table)
    assert figures["measured_over_table"] == figures["measured_latency_ms"] / figures["table_latency_ms"]
