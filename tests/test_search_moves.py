"""The search's schedule (budget ramp, temperature restarts, the logits' own optimizer) and a
small problem where the constrained search must leave an infeasible start for a known
non-uniform optimum."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hmqsearch.constrained.budgets import BudgetSpec, build_constraints
from hmqsearch.constrained.constraints import enforce_on
from hmqsearch.constrained.last_feasible import LastFeasible
from hmqsearch.constrained.ramp import RampSpec
from hmqsearch.errors import UserError
from hmqsearch.lit.search import SearchModule
from hmqsearch.quant.prepare import Pin, QuantSpec, prepare


@pytest.mark.parametrize("progress, step", [(0.0, 1), (0.1, 1), (0.2, 2), (0.34, 3), (0.49, 3), (0.5, 4), (1.0, 4)])
def test_ramp_bound_at_each_step(progress, step):
    ramp = RampSpec(steps=4, until=0.5)
    start, budget = 800.0, 100.0  # 4 steps in the reciprocal ("compression") domain: 1/800 .. 1/100
    assert ramp.segment(progress) == step
    expected = 1.0 / (1.0 / start + step / 4 * (1.0 / budget - 1.0 / start))
    assert ramp.bound(start, budget, progress) == pytest.approx(expected)
    assert ramp.bound(start, budget, 1.0) == pytest.approx(budget)  # the last step is the budget itself


def test_ramp_holds_a_feasible_start_and_no_ramp_is_the_budget():
    assert RampSpec(steps=4).bound(50.0, 100.0, 0.0) == 100.0
    assert RampSpec(steps=0).bound(800.0, 100.0, 0.0) == 100.0
    bounds = [RampSpec(steps=3, until=0.6).bound(800.0, 100.0, p / 100) for p in range(101)]
    assert all(a >= b for a, b in zip(bounds, bounds[1:])) and len(set(bounds)) == 3


def test_temperature_restarts_with_each_ramp_step():
    ramp = RampSpec(steps=4, until=0.6)  # steps begin at 0, 0.2, 0.4, 0.6
    for start in (0.0, 0.2, 0.4, 0.6):
        assert ramp.temperature(1.0, 0.5, start) == pytest.approx(1.0)
    assert ramp.temperature(1.0, 0.5, 0.2 - 1e-9) == pytest.approx(0.5, abs=1e-6)  # decayed to the floor
    assert ramp.temperature(1.0, 0.5, 1.0) == pytest.approx(0.5)
    assert ramp.temperature(1.0, 0.5, 0.1) == pytest.approx(0.5 ** 0.5)  # exponential, halfway
    flat = RampSpec(steps=4, until=0.6, tau_restart=False)
    taus = [flat.temperature(1.0, 0.5, p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(taus, taus[1:]))  # one decay over the whole search


@pytest.mark.parametrize("field, value", [("steps", -1), ("steps", 1.5), ("until", 1.0), ("until", float("nan"))])
def test_bad_ramp_settings_are_user_errors(field, value):
    with pytest.raises(UserError, match=f"search.ramp.{field}="):
        RampSpec(**{field: value}).validate()


class TwoBranches(nn.Module):
    """logits = important(x) + unimportant(x): two Linear layers of the same size, one of which
    carries the classifier and one a small perturbation."""

    def __init__(self) -> None:
        super().__init__()
        self.important = nn.Linear(32, 4, bias=False)
        self.unimportant = nn.Linear(32, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.important(x) + self.unimportant(x)


def two_branch_problem():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 32, generator=g)
    x = torch.randn(1024, 32, generator=g)
    y = (x @ teacher.T).argmax(1)
    net = TwoBranches()
    with torch.no_grad():
        net.important.weight.copy_(3.0 * teacher)
        net.unimportant.weight.copy_(0.05 * torch.randn(4, 32, generator=g))
    spec = QuantSpec(  # inputs float: the search is about the two weight tensors
        weight_bits=[1, 2, 8], act_bits=[8], first_layer_act_bits=None, n_thresholds=4,
        pins=[Pin("*", act_bits="float")],
    )
    return prepare(net, spec, x[:8]), TensorDataset(x, y)


@pytest.mark.parametrize("enforce", ["argmax", "argmax_only"])
def test_constrained_search_moves_from_an_infeasible_start_to_the_non_uniform_optimum(enforce):
    """Budget 4.5 bits a weight on average: only (8, 1) fits with an 8-bit layer. The start (8, 8)
    is infeasible; uniform 2 bits fits but hurts the important layer. The search must end with
    its own argmax at important 8, unimportant 1 (no repair), and the duals ending the violation."""
    torch.manual_seed(0)
    qmodel, data = two_branch_problem()
    constraints = build_constraints(qmodel, BudgetSpec(weight_compression=32 / 4.5), None)
    [c] = constraints
    enforce_on(constraints, qmodel, enforce)
    assert not c.satisfied()  # the 8-bit start breaks the budget
    qmodel.set_state("search")
    module = SearchModule(
        qmodel, 4, functools.partial(torch.optim.Adam), 0.0, 0.1, constraints, dual_lr=0.5, tau_start=1.0,
        tau_end=0.2, logit_optimizer=functools.partial(torch.optim.Adam), ramp=RampSpec(steps=3, until=0.5),
    )
    trainer = pl.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    module.train()
    trainer.fit(module, DataLoader(data, batch_size=64, shuffle=True))
    layers = dict(qmodel.layers())
    assert layers["important"].wq.argmax().bits == 8
    assert layers["unimportant"].wq.argmax().bits == 1
    assert c.satisfied()
    assert c.bound == pytest.approx(c.budget)  # the ramp ended on the budget itself
    assert module.trace.moved(module.trace.argmax_bits()) == ["unimportant.weight"]
    assert [e["epoch"] for e in module.trace.history if e.get("epoch") is not None] == list(range(6))


def test_logit_optimizer_state_and_trace_survive_a_checkpoint(tmp_path):
    qmodel, data = two_branch_problem()
    constraints = build_constraints(qmodel, BudgetSpec(weight_compression=6), None)
    qmodel.set_state("search")
    make = lambda q, cs: SearchModule(  # noqa: E731
        q, 4, functools.partial(torch.optim.SGD), 0.0, 0.1, cs, dual_lr=0.5,
        logit_optimizer=functools.partial(torch.optim.Adam), ramp=RampSpec(steps=2),
    )
    module = make(qmodel, constraints)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(data, batch_size=64))
    path = tmp_path / "search.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["logit_optimizer"]["state"], "the logits' Adam moments are saved"
    fresh_q, _ = two_branch_problem()
    fresh = make(fresh_q, build_constraints(fresh_q, BudgetSpec(weight_compression=6), None))
    fresh.on_load_checkpoint(ckpt)
    fresh.trainer = trainer  # configure_optimizers reads the step count from the trainer
    fresh.configure_optimizers()
    saved = ckpt["logit_optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(fresh.logit_optimizer.state_dict()["state"][0]["exp_avg"], saved)
    assert fresh.trace.history == module.trace.history


def test_argmax_enforcement_sees_the_argmax_cost_with_the_expected_gradient():
    qmodel, _ = two_branch_problem()
    [c] = build_constraints(qmodel, BudgetSpec(weight_compression=6), None)
    for _, q in qmodel.quantizers():
        q.reset_logits()  # 95 % on 8 bits: the expected cost is below the argmax's (all 8-bit)
    expected = c.violation()
    enforce_on([c], qmodel, "argmax")
    hard = c.violation()
    assert hard.item() == pytest.approx(c.exact() / c.budget - 1.0, rel=1e-6) and hard.item() > expected.item()
    g_expected = torch.autograd.grad(expected, [q.logits for _, q in qmodel.quantizers() if q.logits.requires_grad][:1])
    g_hard = torch.autograd.grad(c.violation(), [q.logits for _, q in qmodel.quantizers() if q.logits.requires_grad][:1])
    assert torch.allclose(g_expected[0], g_hard[0])
    with pytest.raises(UserError, match="search.enforce='sometimes'"):
        enforce_on([c], qmodel, "sometimes")


def test_argmax_only_enforcement_releases_the_duals_once_the_argmax_fits():
    """The argmax at 1 bit with much of the mass on 8 bits: E[c] is over the budget, the argmax
    under it. ``argmax`` still reports a violation (the larger of the two); ``argmax_only`` reports
    the argmax's slack, negative, so the duals fall; both keep E[c]'s gradient."""
    qmodel, _ = two_branch_problem()
    [c] = build_constraints(qmodel, BudgetSpec(weight_compression=12), None)
    for _, q in qmodel.quantizers():
        if q.logits.requires_grad:
            with torch.no_grad():
                q.logits.fill_(0.0)
                q.logits[0].add_(2.0)  # 1 bit, every threshold
                q.logits[-1].add_(1.5)  # 8 bits
    logits = [q.logits for _, q in qmodel.quantizers() if q.logits.requires_grad][:1]
    expected = c.violation()
    assert expected.item() > 0 and c.satisfied()
    enforce_on([c], qmodel, "argmax")
    both = c.violation()
    enforce_on([c], qmodel, "argmax_only")
    alone = c.violation()
    assert both.item() == pytest.approx(expected.item(), rel=1e-6)
    assert alone.item() == pytest.approx(c.exact() / c.budget - 1.0, rel=1e-6) and alone.item() < 0
    assert torch.allclose(torch.autograd.grad(expected, logits)[0], torch.autograd.grad(alone, logits)[0])


def test_last_feasible_keeps_the_logits_of_the_last_feasible_step():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    kept = LastFeasible([p])
    assert not kept.restore()  # no feasible step yet: nothing to restore
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 4.0]))
    kept.record(torch.tensor(True))
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, 6.0]))
    kept.record(torch.tensor(False))  # an infeasible step leaves the kept copy alone
    assert kept.restore() and p.tolist() == [3.0, 4.0]
    assert set(kept.state_dict()) == {"logits_0", "seen"}  # in every checkpoint


def test_search_ending_on_its_last_feasible_argmax_needs_no_repair():
    """The argmax-only duals with restarts oscillate around the budget; the search ends on the
    last step of its final phase whose argmax met the budget."""
    torch.manual_seed(0)
    qmodel, data = two_branch_problem()
    constraints = build_constraints(qmodel, BudgetSpec(weight_compression=32 / 4.5), None)
    [c] = constraints
    enforce_on(constraints, qmodel, "argmax_only")
    qmodel.set_state("search")
    module = SearchModule(
        qmodel, 4, functools.partial(torch.optim.Adam), 0.0, 0.1, constraints, dual_lr=0.5, tau_start=1.0,
        tau_end=0.2, logit_optimizer=functools.partial(torch.optim.Adam), ramp=RampSpec(steps=3, until=0.5),
        dual_restart=True, end_feasible=True,
    )
    trainer = pl.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    module.train()
    trainer.fit(module, DataLoader(data, batch_size=64, shuffle=True))
    assert module.restore_last_feasible()
    assert c.satisfied()
    layers = dict(qmodel.layers())
    assert (layers["important"].wq.argmax().bits, layers["unimportant"].wq.argmax().bits) == (8, 1)
