"""On a GPU the search and fine-tune steps never read a value back to the host: each read
waits for the queued kernels, and a small network's step is bound by such waits and launches
(ResNet-20 on an H200 went from 66 to 55 ms a search step and 39 to 29 ms a fine-tune step when
they were removed; docs/benchmark.md). Run with ``python -m pytest -m gpu``."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from hmqsearch.constrained.budgets import BudgetSpec, build_constraints
from hmqsearch.constrained.dual import DualVariables
from hmqsearch.cost import latency as lat
from hmqsearch.models import resnet_cifar
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import QuantSpec, prepare

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TARGET = {"name": "edge_npu", "int8_macs_per_s": 1.0e12, "bytes_per_s": 8.0e9}
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's own notice that the mode is a prototype does not count


def host_reads(step: Callable[[], None]) -> list[str]:
    """Where one call of ``step`` synchronises with the GPU (torch's sync debug mode)."""
    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message)]


def test_host_reads_counts_a_value_read_back() -> None:
    value = torch.ones(4, device="cuda")
    assert host_reads(lambda: value.sum().item()) != []


def test_search_and_finetune_steps_do_not_synchronise() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    qmodel = prepare(resnet_cifar.resnet20(num_classes=10), QuantSpec(weight_bits=[2, 4, 8], act_bits=[4, 8]), x[:8])
    table = lat.build_latency_table(qmodel, "analytic", TARGET, None)
    qmodel.to(device)
    x, y = x.to(device), y.to(device)
    calibrate_activations(qmodel, [x])
    constraints = build_constraints(qmodel, BudgetSpec(weight_compression=8), table)
    duals = DualVariables([c.name for c in constraints], lr=0.05).to(device)
    optimizer = torch.optim.Adam([*qmodel.weight_parameters(), *qmodel.logit_parameters()], lr=1e-4)
    qmodel.set_state("search")
    qmodel.set_tau(1.0)
    qmodel.train()

    def search_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        v = torch.stack([c.violation() for c in constraints])
        loss = F.cross_entropy(qmodel(x), y) + duals.lagrangian_term(v) + 1e-3 * lat.expected_latency(qmodel, table)
        loss.backward()
        optimizer.step()
        duals.ascend(v.detach())

    assert host_reads(search_step) == []

    qmodel.set_state("fixed")

    def finetune_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(qmodel(x), y).backward()
        optimizer.step()

    assert host_reads(finetune_step) == []
