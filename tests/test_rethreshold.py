"""``search.rethreshold``: after the search every threshold is re-chosen at the searched
bit-widths on the search's own weights, on the digits default with short epochs."""

from __future__ import annotations

import torch

from conftest import compose_train
from hmqsearch.methods.assigned import widths_of
from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.functional import fake_quant_pot, step_size
from hmqsearch.quant.scheme import Scheme
from hmqsearch.run import stages


def _weight_mse(weight: torch.Tensor, scheme: Scheme, shift: int) -> float:
    """Quantization MSE of ``weight`` under ``scheme`` with every threshold moved by 2^shift."""
    exps = torch.tensor(scheme.threshold_exp, dtype=torch.float32) + shift
    step = step_size(torch.exp2(exps), scheme.bits, scheme.signed)
    step = step.reshape(-1, *[1] * (weight.dim() - 1)) if scheme.per_channel else step
    return float((fake_quant_pot(weight, step, scheme.bits, scheme.signed) - weight).pow(2).mean())


def test_rethreshold_keeps_the_searched_weights_and_widths_at_the_lowest_mse_thresholds(tmp_path):
    cfg = compose_train("pretrain.epochs=4", "search.epochs=1", "finetune.epochs=1", "logger=none",
                        "callbacks.progress_bar=false", "search.rethreshold=true", "search.logit_lr=0.2")
    state = stages.validate(cfg, tmp_path)
    for stage in (stages.build, stages.pretrain, stages.evaluate_float, stages.calibrate,
                  stages.start_search, stages.search, stages.repair_assignment, stages.fill_assignment):
        stage(state)
    searched = state.qmodel
    before = Assignment.of(searched)
    weights = {name: layer.weight.detach().clone() for name, layer in searched.layers()}

    stages.rethreshold(state)

    after = Assignment.of(state.qmodel)
    assert state.qmodel is searched and widths_of(after) == widths_of(before)
    assert any(s.weight.bits != 8 for s in after.values() if s.weight)  # the search moved
    changed = 0
    for name, layer in state.qmodel.layers():
        assert torch.equal(layer.weight, weights[name])
        scheme = after[name].weight
        best = _weight_mse(layer.weight.detach(), scheme, 0)
        assert all(best <= _weight_mse(layer.weight.detach(), scheme, k) for k in (-2, -1, 1, 2)), name
        changed += scheme.threshold_exp != before[name].weight.threshold_exp
    assert changed, "no threshold moved: the test would pass without the stage"
    assert all(c.satisfied() for c in state.constraints)  # thresholds cost nothing: the budgets still hold
    assert {q.state for _, q in state.qmodel.quantizers() if not q.float_pinned} == {"fixed"}
