"""bf16 autocast (trainer.precision=bf16-mixed): the quantizers compute in float32 and give what
they give without autocast, while the layers around them run in bfloat16; and the learning
rates scaled with the batch size (scale_lr)."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from hmqsearch.config_schema import TrainConfig, check_config
from hmqsearch.errors import UserError
from hmqsearch.lit.classifier import ClassifierModule
from hmqsearch.lr_scaling import SCALED, lr_factor, processes, scale_learning_rates
from hmqsearch.models.small_cnn import SmallCNN
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantSpec, prepare

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def quantizer(state: str, per_channel: bool) -> HMQQuantizer:
    torch.manual_seed(0)
    q = HMQQuantizer([2, 4, 8], 4, per_channel_axis=0 if per_channel else None, num_channels=4 if per_channel else 1,
                     signed=per_channel)
    q.set_range(torch.rand(4 if per_channel else 1) + 0.5)
    with torch.no_grad():
        q.logits.normal_()
    q.state = state
    return q.train()


def run(q: HMQQuantizer, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Output and the gradients of the input and the logits."""
    q.logits.grad = None
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(7)  # the same Gumbel sample
    if autocast:
        with BF16:
            out = q(x)
    else:
        out = q(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [x.grad, q.logits.grad]


@pytest.mark.parametrize("state", ["search", "fixed"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantizer_under_bf16_autocast_is_float32_and_unchanged(state: str, per_channel: bool) -> None:
    q = quantizer(state, per_channel)
    x = torch.randn(4, 3, 3, 3) if per_channel else torch.rand(2, 4, 5, 5) * 2
    want, want_grad = run(q, x, autocast=False)
    got, got_grad = run(q, x, autocast=True)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    assert (want_grad[1] is None) == (state == "fixed")  # the fixed state's argmax takes no gradient
    for g, w in zip(got_grad, want_grad):
        assert (g is None and w is None) or (g.dtype == w.dtype and torch.equal(g, w))


def test_bf16_input_under_autocast_is_quantized_in_float32() -> None:
    q = quantizer("search", per_channel=True)
    x = torch.randn(4, 3, 3, 3).bfloat16()
    got, _ = run(q, x, autocast=True)
    want, _ = run(q, x.float(), autocast=False)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_lightning_bf16_mixed_runs_layers_in_bf16_and_quantizers_in_float32() -> None:
    pl.seed_everything(0)
    x = torch.randn(64, 1, 8, 8)
    qmodel = prepare(SmallCNN(num_classes=10), QuantSpec(weight_bits=[4, 8], act_bits=[8]), x[:8])
    calibrate_activations(qmodel, [x])
    qmodel.set_state("search")
    seen: dict[str, set[torch.dtype]] = {"quantizer": set(), "layer": set()}
    layer = qmodel.net.conv1
    layer.aq.register_forward_hook(lambda m, i, o: seen["quantizer"].add(o.dtype))
    layer.wq.register_forward_hook(lambda m, i, o: seen["quantizer"].add(o.dtype))
    layer.register_forward_hook(lambda m, i, o: seen["layer"].add(o.dtype))
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (64,)))
    module = ClassifierModule(qmodel, 10, torch.optim.SGD, lr=0.05)
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module.train(), torch.utils.data.DataLoader(data, batch_size=16))
    assert seen == {"quantizer": {torch.float32}, "layer": {torch.bfloat16}}
    assert all(torch.isfinite(p).all() for p in module.parameters())


def lr_cfg(rule: str, batch: int, base: int = 128, trainer: dict | None = None):
    return OmegaConf.create({
        "scale_lr": rule, "scale_lr_base": base, "data": {"batch_size": batch},
        "trainer": trainer or {"devices": 1},
        "pretrain": {"lr": 0.01}, "search": {"lr": 1e-3, "logit_lr": 0.02, "dual_lr": 0.1},
        "finetune": {"lr": "${search.lr}"},
    })


def test_linear_and_sqrt_scaling_multiply_every_learning_rate(caplog: pytest.LogCaptureFixture) -> None:
    base = lr_cfg("none", 512)
    assert scale_learning_rates(base) is base
    with caplog.at_level(logging.INFO, logger="hmqsearch.lr_scaling"):
        linear = scale_learning_rates(lr_cfg("linear", 512))
    for key in SCALED:
        assert OmegaConf.select(linear, key) == pytest.approx(4 * OmegaConf.select(base, key))
    assert "x 4 for a global batch of 512 (base 128)" in caplog.text and "search.logit_lr 0.02 -> 0.08" in caplog.text
    root = scale_learning_rates(lr_cfg("sqrt", 512))
    assert root.pretrain.lr == pytest.approx(0.02) and root.finetune.lr == pytest.approx(2e-3)
    assert lr_factor(lr_cfg("linear", 64, base=64)) == 1.0


def test_ddp_processes_count_into_the_global_batch() -> None:
    ddp = {"strategy": "ddp", "devices": 2, "num_nodes": 2}
    assert processes(OmegaConf.create(ddp)) == 4
    assert processes(OmegaConf.create({"strategy": "ddp", "devices": "0,3"})) == 2
    assert processes(OmegaConf.create({"strategy": "auto", "devices": 4})) == 1
    assert lr_factor(lr_cfg("linear", 128, trainer=ddp)) == 4.0
    with pytest.raises(UserError, match="trainer.devices='auto'"):
        lr_factor(lr_cfg("linear", 128, trainer={"strategy": "ddp", "devices": "auto"}))


def test_bad_scaling_values_are_clear_errors() -> None:
    schema = OmegaConf.structured(TrainConfig)
    with pytest.raises(UserError, match=r"scale_lr='cubic'; allowed: none, linear, sqrt"):
        check_config(OmegaConf.merge(schema, {"scale_lr": "cubic"}))
    with pytest.raises(UserError, match=r"scale_lr_base=0; allowed: an integer >= 1"):
        check_config(OmegaConf.merge(schema, {"scale_lr": "linear", "scale_lr_base": 0}))
