"""step_capture: the training step's forward and backward through torch.compile, against the
eager step (same loss, gradients, logits and duals after N steps), state-dict keys unchanged.

On the CPU the default suite traces with the ``aot_eager`` backend (dynamo + AOTAutograd, the
fake-quant custom op and its autograd, no code generation: Inductor takes minutes on the
2-core CI machine); ``-m slow`` runs Inductor itself on the CPU, ``-m gpu`` Inductor and CUDA
graphs on a GPU, with the no-host-sync check of tests/test_gpu_step.py."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator

import pytest
import pytorch_lightning as pl
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from omegaconf import OmegaConf

from hmqsearch.config_schema import TrainConfig, check_config
from hmqsearch.constrained.budgets import BudgetSpec, build_constraints
from hmqsearch.constrained.dual import DualVariables
from hmqsearch.errors import UserError
from hmqsearch.lit import capture
from hmqsearch.lit.capture import capture_forward, check_capture
from hmqsearch.lit.classifier import ClassifierModule
from hmqsearch.models import resnet_cifar
from hmqsearch.models.small_cnn import SmallCNN
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import QuantSpec, prepare

STEPS = 3


@pytest.fixture
def eager_random() -> Iterator[None]:
    """Compiled random ops draw what eager ones draw (the Gumbel noise), so the runs compare."""
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


class Run:
    """A quantized network with its budget duals and optimizer: search steps, then fine-tune steps."""

    def __init__(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
        self.x, self.y = x.to(device), y.to(device)
        qmodel = prepare(net, QuantSpec(weight_bits=[2, 4, 8], act_bits=[4, 8]), x[:8]).to(device)
        calibrate_activations(qmodel, [self.x])
        self.constraints = build_constraints(qmodel, BudgetSpec(weight_compression=8), None)
        self.duals = DualVariables([c.name for c in self.constraints], lr=0.05).to(device)
        self.module = ClassifierModule(qmodel, 10, torch.optim.Adam, lr=1e-3)
        self.opt = torch.optim.Adam([*qmodel.weight_parameters(), *qmodel.logit_parameters()], lr=1e-3)
        qmodel.set_state("search")
        qmodel.set_tau(0.7)
        qmodel.train()

    @property
    def qmodel(self):
        return self.module.model

    def search_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.opt.zero_grad(set_to_none=True)
        v = torch.stack([c.violation() for c in self.constraints])
        logits = self.module(self.x)
        loss = F.cross_entropy(logits, self.y) + self.duals.lagrangian_term(v)
        loss.backward()
        self.opt.step()
        self.duals.ascend(v.detach())
        return loss.detach(), logits.detach()

    def finetune_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.opt.zero_grad(set_to_none=True)
        logits = self.module(self.x)
        loss = F.cross_entropy(logits, self.y)
        loss.backward()
        self.opt.step()
        return loss.detach(), logits.detach()

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in self.qmodel.parameters() if p.grad is not None]


def compare(make_net: Callable[[], torch.nn.Module], mode: str, device: torch.device, tol: float) -> None:
    """N search steps, then N fine-tune steps, eager and captured from the same start and seeds."""
    torch.manual_seed(0)
    x, y = torch.randn(16, *make_net.input_shape), torch.randint(0, 10, (16,))
    net = make_net()
    eager, captured = Run(copy.deepcopy(net), x, y, device), Run(copy.deepcopy(net), x, y, device)
    keys = list(captured.module.state_dict())
    capture_forward(captured.module, mode)
    assert list(captured.module.state_dict()) == keys  # checkpoints keep their keys
    for phase in ("search", "finetune"):
        if phase == "finetune":
            for run in (eager, captured):
                run.qmodel.set_state("fixed")
        for step in range(STEPS):
            results = []
            for run in (eager, captured):
                torch.manual_seed(100 + step)  # the same Gumbel noise
                results.append((*getattr(run, f"{phase}_step")(), run.grads()))
            (loss_e, logits_e, grads_e), (loss_c, logits_c, grads_c) = results
            torch.testing.assert_close(loss_c, loss_e, rtol=tol, atol=tol)
            torch.testing.assert_close(logits_c, logits_e, rtol=tol, atol=tol)
            assert len(grads_c) == len(grads_e)
            for gc, ge in zip(grads_c, grads_e):
                torch.testing.assert_close(gc, ge, rtol=tol, atol=tol)
    torch.testing.assert_close(captured.duals.values, eager.duals.values, rtol=tol, atol=tol)
    for pc, pe in zip(captured.qmodel.parameters(), eager.qmodel.parameters()):
        torch.testing.assert_close(pc, pe, rtol=tol, atol=tol)


def small_cnn() -> torch.nn.Module:
    return SmallCNN(num_classes=10)


small_cnn.input_shape = (1, 8, 8)


def resnet20() -> torch.nn.Module:
    return resnet_cifar.resnet20(num_classes=10)


resnet20.input_shape = (3, 32, 32)


def test_bad_step_capture_values_are_clear_errors() -> None:
    with pytest.raises(UserError, match=r"step_capture='graphs'; allowed: none, compile, cuda-graphs"):
        check_config(OmegaConf.merge(OmegaConf.structured(TrainConfig), {"step_capture": "graphs"}))
    with pytest.raises(UserError, match="cuda-graphs.*trains on cpu; allowed here: none, compile"):
        check_capture("cuda-graphs", torch.device("cpu"))
    check_capture("compile", torch.device("cpu"))


def test_traced_step_equals_the_eager_step_on_cpu(eager_random: None, aot_eager: None) -> None:
    compare(small_cnn, "compile", torch.device("cpu"), tol=1e-6)


def test_lightning_fit_with_a_captured_forward_equals_eager(aot_eager: None) -> None:
    weights = []
    for mode in ("none", "compile"):
        pl.seed_everything(0)
        torch._dynamo.reset()
        x = torch.randn(64, 1, 8, 8)
        qmodel = prepare(SmallCNN(num_classes=10), QuantSpec(weight_bits=[4, 8], act_bits=[8]), x[:8])
        calibrate_activations(qmodel, [x])
        qmodel.set_state("fixed")
        data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (64,)))
        module = ClassifierModule(qmodel, 10, torch.optim.SGD, lr=0.05)
        capture_forward(module, mode)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
        weights.append([p.detach().clone() for p in module.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_inductor_step_equals_the_eager_step_on_cpu(eager_random: None) -> None:
    compare(small_cnn, "compile", torch.device("cpu"), tol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["compile", "cuda-graphs"])
def test_captured_step_equals_the_eager_step_on_gpu(eager_random: None, mode: str) -> None:
    compare(resnet20, mode, torch.device("cuda"), tol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_search_step_does_not_synchronise() -> None:
    from test_gpu_step import host_reads  # tests/ is on sys.path (pytest prepend import mode)

    torch.manual_seed(0)
    run = Run(resnet20(), torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)), torch.device("cuda"))
    capture_forward(run.module, "cuda-graphs")
    for _ in range(3):  # compile, record, replay
        run.search_step()
    assert host_reads(run.search_step) == []
