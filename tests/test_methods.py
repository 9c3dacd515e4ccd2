"""The methods behind one interface: what each declares, how conf/method/ selects it, and each
one through train.py on the digits default, SPIQ data-free (no training, no calibration batch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import compose_train
from hmqsearch.data.digits import DigitsDataModule
from hmqsearch.errors import UserError
from hmqsearch.export.packed import load_packed
from hmqsearch.lit.evaluate import evaluate
from hmqsearch.export.precision import write_precision
from hmqsearch.methods import METHODS, PTQ, SPIQ, Assigned, HMQSearch, Method, Precision, Prepared, UniformQAT
from hmqsearch.models.small_cnn import SmallCNN
from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.prepare import QuantSpec, prepare
from hmqsearch.quant.spiq import InputChannelScale
from hmqsearch.run.config import run_method
from hmqsearch.run.load import load_run

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("hmq", "uniform", "ptq", "spiq")
SHORT = ["pretrain.epochs=8", "search.epochs=1", "finetune.epochs=1", "logger=csv", "callbacks.progress_bar=false"]


def test_each_method_declares_what_the_run_does_around_it():
    declared = {name: (m.searches, m.calibrates, m.trains) for name, m in METHODS.items()}
    assert declared == {
        "hmq": (True, True, True), "uniform": (False, True, True), "ptq": (False, True, False), "spiq": (False, False, False),
        "assigned": (False, True, True),
    }
    assert all(issubclass(m, Method) for m in METHODS.values())
    assert [HMQSearch().label, UniformQAT("w4a8").label, PTQ().label, SPIQ("W4A4").label] == [
        "hmq", "uniform W4A8", "ptq W8A8", "spiq W4A4",
    ]
    spec = QuantSpec(weight_bits=[2, 4, 8], act_bits=[4, 8])
    assert HMQSearch().quant_spec(spec) is spec
    assert (list(SPIQ("W4A8").quant_spec(spec).weight_bits), list(SPIQ("W4A8").quant_spec(spec).act_bits)) == ([4], [8])


@pytest.mark.parametrize("overrides, expected", [
    ([], HMQSearch()),
    (["method=uniform", "method.precision=W4A8"], UniformQAT(Precision(4, 8))),
    (["method=ptq"], PTQ("W8A8")),
    (["method=spiq", "method.k=4", "method.power_of_two=true"], SPIQ("W8A8", k=4.0, power_of_two=True)),
])
def test_conf_method_selects_the_class_with_target(overrides, expected):
    assert run_method(compose_train(*overrides)) == expected


def test_a_config_written_before_target_names_the_method():
    assert run_method(OmegaConf.create({"method": {"name": "uniform", "precision": "W2A8"}})) == UniformQAT("W2A8")
    assert run_method(OmegaConf.create({"method": {"name": "hmq"}})) == HMQSearch()
    assert run_method(OmegaConf.create({})) == HMQSearch()


def test_bad_method_options_give_one_clear_message():
    for make, fragment in (
        (lambda: run_method(compose_train("method=spiq", "method.precision=W0A8")), "method.precision='W0A8'; expected WxAy"),
        (lambda: SPIQ(k=0), "method.k=0; allowed: a number > 0"),
        (lambda: SPIQ(power_of_two="yes"), "method.power_of_two='yes'; allowed: true, false"),
    ):
        with pytest.raises(UserError, match=fragment):
            make()


def _bn_net() -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN().eval()
    for m in net.modules():  # batch-norm statistics as a trained network has them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def test_spiq_assigns_without_data_and_keeps_the_float_function():
    net, x = _bn_net(), torch.randn(64, 1, 8, 8)
    method = SPIQ("W8A8")
    qmodel = prepare(net, method.quant_spec(QuantSpec()), torch.zeros(8, 1, 8, 8))
    assignment = method.assign(Prepared(qmodel, net, input_mean=(0.0,), input_std=(1.0,)))
    assert assignment == Assignment.of(qmodel)
    assert {(s.weight.bits, s.input.bits) for s in assignment.values()} == {(8, 8)}
    assert sum(isinstance(m, InputChannelScale) for m in qmodel.modules()) == len(assignment)
    qmodel.set_state("fixed")
    with torch.no_grad():
        want, got = net(x), qmodel.eval()(x)
    assert (want.argmax(1) == got.argmax(1)).float().mean() >= 0.9
    with pytest.raises(UserError, match="method=spiq needs the data's input normalisation"):
        SPIQ().assign(Prepared(prepare(net, QuantSpec(weight_bits=[8], act_bits=[8]), x[:8]), net))


class _Branchy(torch.nn.Module):
    """A network torch.fx cannot trace: its forward branches on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)


def test_spiq_refuses_before_training_what_it_cannot_read():
    with pytest.raises(UserError, match="method=spiq needs a torch.fx-traceable network"):
        SPIQ().check(_Branchy(), (0.0,), (1.0,))
    with pytest.raises(UserError, match="method=spiq needs the data's input normalisation"):
        SPIQ().check(SmallCNN(), None, None)
    SPIQ().check(SmallCNN(), (0.5,), (0.25,))
    HMQSearch().check(_Branchy(), None, None)  # the others take any network


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """hmq, uniform, ptq and spiq through train.py on the digits default, short epochs."""
    tmp = tmp_path_factory.mktemp("methods")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *SHORT, f"method={','.join(ORDER)}",
         f"hydra.sweep.dir={tmp / 'multirun'}"],
        cwd=tmp, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for i, name in enumerate(ORDER):
        run_dir = tmp / "multirun" / str(i)
        runs[name] = run_dir, json.loads((run_dir / "summary.json").read_text())
    return runs


@pytest.mark.parametrize("name", ORDER)
def test_each_method_runs_from_train_py(sweep, name):
    run_dir, summary = sweep[name]
    assert summary["method"]["name"] == name and summary["finished"] is True
    assert summary["export"]["passed"] is True
    trained = {stage for stage in ("search", "finetune") if (run_dir / "checkpoints" / stage).is_dir()}
    assert trained == {"hmq": {"search", "finetune"}, "uniform": {"finetune"}}.get(name, set())
    assert (summary["feasible"] is None) == (name != "hmq")


def test_spiq_trains_nothing_uses_no_calibration_data_and_is_near_float(sweep):
    run_dir, summary = sweep["spiq"]
    assert summary["method"]["label"] == "spiq W8A8"
    assert summary["method"]["calibration_batches"] == 0 and summary["method"]["calibration"] is None
    assert summary["activation_ranges"] == {}
    assert "finetune_s" not in summary["timings"] and summary["search_top1"] == summary["quant_top1"]
    assert summary["search_start_weight_bits"] is None and summary["duals"] == {}
    assert 50.0 <= summary["quant_top1"] <= 100.0 and summary["quant_top1"] >= summary["float_top1"] - 5.0
    assert sweep["ptq"][1]["method"]["calibration_batches"] == 4  # the others calibrate as before


def test_a_spiq_run_loads_back_from_its_packed_checkpoint_and_its_run_directory(sweep):
    run_dir, summary = sweep["spiq"]
    data = DigitsDataModule()
    data.setup("fit")
    packed = load_packed(run_dir / "model.packed")
    assert sum(isinstance(m, InputChannelScale) for m in packed.modules()) == 5
    assert evaluate(packed, data.test_dataloader(), 10) == pytest.approx(summary["quant_top1"])
    finished = load_run(run_dir)
    assert evaluate(finished.qmodel, data.test_dataloader(), 10) == pytest.approx(summary["quant_top1"])


def _widths(assignment: Assignment) -> dict[str, tuple[int | None, int | None]]:
    return {name: tuple(None if x is None else x.bits for x in s) for name, s in assignment.items()}


def test_assigned_trains_the_bit_widths_of_a_precision_file_at_this_runs_thresholds(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    source = prepare(SmallCNN(), QuantSpec(weight_bits=[2, 3, 4, 8], act_bits=[4, 8]), x)
    for bits, (_, layer) in zip([8, 2, 3, 4, 8], source.layers()):
        layer.wq.fix(layer.wq.scheme_at(bits))
    path = write_precision(tmp_path / "precision.yaml", Assignment.of(source))
    method = Assigned(path=str(path))
    spec = method.quant_spec(QuantSpec())
    assert (list(spec.weight_bits), list(spec.act_bits)) == ([2, 3, 4, 8], [8])  # the file's widths
    qmodel = prepare(SmallCNN(), spec, x)
    assignment = method.assign(Prepared(qmodel, qmodel.net))
    assert _widths(assignment) == _widths(Assignment.of(source)) and assignment == Assignment.of(qmodel)
    for _, layer in qmodel.layers():  # the threshold each width prefers here, not the file's
        assert layer.wq.argmax() == layer.wq.scheme_at(layer.wq.argmax().bits)
    assert method.label == f"assigned {path}"


def test_assigned_refuses_a_file_that_does_not_fit_the_model(tmp_path):
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(UserError, match="method=assigned needs method.path"):
        Assigned().widths()
    with pytest.raises(UserError, match="does not exist"):
        Assigned(path=str(tmp_path / "none.yaml")).widths()
    source = prepare(SmallCNN(), QuantSpec(weight_bits=[4], act_bits=[8]), x)
    layers = Assignment.of(source).to_dict()
    layers.pop(next(iter(layers)))
    path = write_precision(tmp_path / "short.yaml", Assignment.from_dict(layers))
    method = Assigned(path=str(path))
    with pytest.raises(UserError, match="does not match the model: layers missing from it"):
        method.assign(Prepared(prepare(SmallCNN(), method.quant_spec(QuantSpec()), x), SmallCNN()))


def test_assigned_from_train_py_fine_tunes_an_earlier_runs_allocation(sweep, tmp_path):
    hmq_dir, _ = sweep["hmq"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *SHORT, "method=assigned", f"method.path={hmq_dir / 'precision.yaml'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] is True and summary["export"]["passed"] is True
    assert (tmp_path / "run" / "checkpoints" / "finetune").is_dir()
    read = lambda d: {n: (e["weight"]["bits"], e["input"]["bits"])  # noqa: E731
                      for n, e in yaml.safe_load((d / "precision.yaml").read_text())["layers"].items()}
    assert read(tmp_path / "run") == read(hmq_dir)
