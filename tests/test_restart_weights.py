"""``search.restart_weights``: the searched bit-widths fine-tuned from the weights the search
started from, on the digits default with short epochs."""

from __future__ import annotations

import torch

from conftest import compose_train
from hmqsearch.methods.assigned import widths_of
from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.prepare import prepare
from hmqsearch.run import stages


def test_restart_keeps_the_searched_widths_on_the_starting_weights_and_trains_them(tmp_path):
    cfg = compose_train("pretrain.epochs=4", "search.epochs=1", "finetune.epochs=1", "logger=none",
                        "callbacks.progress_bar=false", "search.restart_weights=true", "distill.enabled=true")
    state = stages.validate(cfg, tmp_path)
    stages.build(state)
    stages.pretrain(state)
    stages.evaluate_float(state)
    stages.calibrate(state)
    searched = state.qmodel
    stages.assign(state)

    searched_assignment = Assignment.of(searched)
    searched_widths = widths_of(searched_assignment)
    assert state.qmodel is not searched
    assert widths_of(Assignment.of(state.qmodel)) == searched_widths
    assert any(s.weight.bits != 8 for s in searched_assignment.values() if s.weight)  # the search moved
    start = prepare(state.net, state.spec, state.example)  # the weights the search started from
    moved = False
    for (_, layer), (_, first), (_, old) in zip(state.qmodel.layers(), start.layers(), searched.layers()):
        assert torch.equal(layer.weight, first.weight)
        moved |= not torch.equal(old.weight, first.weight)
        bits = layer.wq.argmax().bits  # each threshold re-chosen on the calibration, as for method=assigned
        assert layer.wq.argmax() == layer.wq.scheme_at(bits)
    assert moved, "the search trained the weights it then drops"
    # the budgets now measure the restarted model, at the searched widths' exact cost
    assert all(c.satisfied() for c in state.constraints)
    assert sum(c.exact() for c in state.constraints) > 0
    assert {q.state for _, q in state.qmodel.quantizers() if not q.float_pinned} == {"fixed"}
    # the fine-tune trains the new copy (the float model it came from is the frozen teacher)
    stages.finetune(state)
    assert all(not torch.equal(layer.weight, first.weight) for (_, layer), (_, first) in zip(state.qmodel.layers(), start.layers()))
    assert widths_of(Assignment.of(state.qmodel)) == searched_widths
