"""Dual ascent, feasibility check, repair, and the search state in checkpoints."""

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hmqsearch.constrained.budgets import BudgetSpec, build_constraints
from hmqsearch.constrained.constraints import Constraint
from hmqsearch.constrained.dual import DualVariables
from hmqsearch.constrained.repair import fill, repair
from hmqsearch.cost import size
from hmqsearch.errors import UserError
from hmqsearch.lit.search import SearchModule
from hmqsearch.quant.prepare import QuantSpec, prepare


def toy(weight_bits=(2, 4, 8)):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    spec = QuantSpec(weight_bits=list(weight_bits), act_bits=[8], first_layer_act_bits=None)
    return prepare(net, spec, torch.randn(4, 16))


def test_dual_update_rule():
    d = DualVariables(["a", "b"], lr=0.5)
    d.ascend(torch.tensor([1.0, -1.0]))
    assert d.as_dict() == {"a": 0.5, "b": 0.0}  # projected onto lambda >= 0
    d.ascend(torch.tensor([-0.4, 2.0]))
    assert d.as_dict() == {"a": pytest.approx(0.3), "b": 1.0}
    assert d.lagrangian_term(torch.tensor([1.0, 1.0])).item() == pytest.approx(1.3)


def test_dual_ascent_moves_expected_size_under_budget():
    """Task: reproduce the float output (prefers 8 bits). Budget: 8x compression (8 bits -> 4 on average)."""
    qmodel = toy()
    budget = size.float_weight_bytes(qmodel) / 8
    c = Constraint("weight_bytes", "bytes", budget, lambda: size.expected_weight_bytes(qmodel),
                   lambda: float(sum(size.exact_weight_bytes(qmodel).values())), size.min_weight_bytes(qmodel))
    duals = DualVariables(["weight_bytes"], lr=0.5)
    x = torch.randn(256, 16)
    with torch.no_grad():
        qmodel.set_state("float")
        target = qmodel(x)
    qmodel.set_state("search")
    qmodel.train()
    opt = torch.optim.Adam(qmodel.logit_parameters(), lr=0.05)
    start, peak_dual = c.violation().item(), 0.0
    for _ in range(300):
        v = c.violation().reshape(1)
        loss = (qmodel(x) - target).pow(2).mean() + duals.lagrangian_term(v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        duals.ascend(v)
        peak_dual = max(peak_dual, duals.as_dict()["weight_bytes"])
    assert start > 0.5
    assert -0.5 < c.violation().item() <= 0.02  # under budget, without collapsing to the minimum
    assert peak_dual > 0  # the dual rose while the budget was violated


def test_infeasible_budget_is_reported_before_training():
    qmodel = toy(weight_bits=(4, 8))
    with pytest.raises(UserError, match=r"weight_bytes budget .* cannot be met: even the lowest candidate precision everywhere costs"):
        build_constraints(qmodel, BudgetSpec(weight_compression=50), None)
    with pytest.raises(UserError, match=r"budget.weight_compression=-1; allowed: a positive number"):
        build_constraints(qmodel, BudgetSpec(weight_compression=-1), None)
    with pytest.raises(UserError, match=r"budget.latency_ms=0"):
        BudgetSpec(latency_ms=0).validate()


def test_repair_lowers_precision_until_feasible():
    qmodel = toy()
    budget = BudgetSpec(weight_compression=7)
    [c] = build_constraints(qmodel, budget, None)
    assert not c.satisfied()  # initial argmax: 8 bits everywhere, 4x
    steps = repair(qmodel, [c])
    assert c.satisfied()
    assert steps and all(s.to_bits < s.from_bits for s in steps)
    # no step was needless: undoing the last one breaks the budget
    assert repair(qmodel, [c]) == []


def test_fill_spends_slack_where_it_buys_most_preference_per_byte():
    """Both layers at 2 bits; the large one leans slightly more on 4 bits. 130 bytes of slack buy
    either the large layer 2 -> 4 (128 bytes) or the small one 2 -> 4 -> 8 (96): per byte the
    small layer wins, and the large one's raise no longer fits afterwards."""
    qmodel = toy()
    (_, big), (_, small) = qmodel.layers()
    for layer, lean in ((big, 3.0), (small, 2.0)):
        with torch.no_grad():
            layer.wq.logits.fill_(-10.0)
            layer.wq.logits[0, 0] = 10.0  # 2 bits
            layer.wq.logits[1, 0] = lean  # the search's second choice: 4 bits
            layer.wq.logits[2, 0] = 0.0
    [c] = build_constraints(qmodel, BudgetSpec(weight_kb=(size.min_weight_bytes(qmodel) + 130) / 1024, scope="layers"), None)
    steps = fill(qmodel, [c])
    assert [(s.quantizer, s.from_bits, s.to_bits) for s in steps] == [
        ("2.weight", 2, 4), ("2.weight", 4, 8)]
    assert big.wq.argmax().bits == 2 and c.satisfied()
    assert fill(qmodel, [c]) == []  # nothing else fits


def test_checkpoint_round_trip_of_duals_and_temperature(tmp_path):
    qmodel = toy()
    constraints = build_constraints(qmodel, BudgetSpec(weight_compression=6), None)
    qmodel.set_state("search")
    opt = functools.partial(torch.optim.Adam)
    module = SearchModule(qmodel, 4, opt, 1e-3, 0.05, constraints, dual_lr=0.5, tau_start=1.0, tau_end=0.1)
    data = TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    module.train()
    trainer.fit(module, DataLoader(data, batch_size=16))
    path = tmp_path / "search.ckpt"
    trainer.save_checkpoint(path)
    duals, tau = module.duals.values.clone(), qmodel.quantizers().__next__()[1].tau.clone()
    assert duals.item() > 0 and tau.item() < 1.0

    fresh_q = toy()
    fresh = SearchModule(fresh_q, 4, opt, 1e-3, 0.05, build_constraints(fresh_q, BudgetSpec(weight_compression=6), None), 0.5)
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    assert torch.equal(fresh.duals.values, duals)
    assert all(torch.equal(q.tau, tau) for _, q in fresh_q.quantizers())
    assert all(torch.equal(a.logits, b.logits) for (_, a), (_, b) in zip(fresh_q.quantizers(), qmodel.quantizers()))


def test_dual_restart_drops_a_dual_to_zero_once_its_constraint_holds():
    plain, restarted = DualVariables(["a", "b"], lr=1.0), DualVariables(["a", "b"], lr=1.0, restart=True)
    for duals in (plain, restarted):
        duals.ascend(torch.tensor([2.0, 1.0]))
        duals.ascend(torch.tensor([-0.5, 0.5]))
    assert plain.values.tolist() == [1.5, 1.5]  # a wound-up dual unwinds at lr * v a step
    assert restarted.values.tolist() == [0.0, 1.5]  # restarted the step its constraint holds
