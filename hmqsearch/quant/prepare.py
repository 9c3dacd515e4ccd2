"""Turn an ordinary ``nn.Module`` into one whose Conv2d / Linear layers carry HMQ quantizers."""

from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from hmqsearch.errors import UserError
from hmqsearch.quant.fold import _replace_module, fold_batchnorm
from hmqsearch.quant.hmq import MODES, HMQQuantizer, State
from hmqsearch.quant.layers import QuantConv2d, QuantLinear

log = logging.getLogger(__name__)

QuantLayer = QuantConv2d | QuantLinear


@dataclass
class Pin:
    """Fixed precision for the layers whose names match ``pattern`` (fnmatch syntax).

    ``weight_bits`` / ``act_bits``: an int pins that bit-width, ``"float"`` leaves the tensor
    unquantized, ``None`` keeps it searched.
    """

    pattern: str
    weight_bits: int | str | None = None
    act_bits: int | str | None = None


@dataclass
class QuantSpec:
    """How a model is quantized: candidate bit-widths, threshold grid, pins."""

    weight_bits: Sequence[int] = (2, 4, 8)
    act_bits: Sequence[int] = (4, 8)
    n_thresholds: int = 8
    weight_per_channel: bool = True
    mode: str = "expected"
    first_layer_act_bits: int | str | None = 8
    pins: Sequence[Pin] = field(default_factory=list)
    fold_bn: bool = True
    init_mass: float = 0.95  # initial probability of the start candidate (warm_start.py)

    def validate(self) -> None:
        for name, bits in (("search.weight_bits", self.weight_bits), ("search.act_bits", self.act_bits)):
            if len(bits) == 0:
                raise UserError(f"{name} is empty; give at least one bit-width in 1..8, e.g. {name}=[4,8]")
            bad = [b for b in bits if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 8]
            if bad:
                raise UserError(f"{name}={list(bits)} contains {bad}; allowed bit-widths are integers 1..8")
            repeated = sorted({b for b in bits if list(bits).count(b) > 1})
            if repeated:
                raise UserError(f"{name}={list(bits)} repeats {repeated}; allowed: each bit-width once, e.g. "
                                f"{name}=[{','.join(map(str, sorted(set(bits))))}]")
        if not isinstance(self.n_thresholds, int) or self.n_thresholds < 1:
            raise UserError(f"search.n_thresholds={self.n_thresholds}; allowed: an integer >= 1")
        if not isinstance(self.init_mass, (int, float)) or not 0.0 < self.init_mass < 1.0:
            raise UserError(f"search.init_mass={self.init_mass}; allowed: a probability strictly between 0 and 1")
        if self.mode not in MODES:
            raise UserError(f"search.mode={self.mode!r}; allowed: {', '.join(MODES)}")
        for pin in self.pins:
            for what, v in (("weight_bits", pin.weight_bits), ("act_bits", pin.act_bits)):
                if v is not None and v != "float" and not (isinstance(v, int) and 1 <= v <= 8):
                    raise UserError(
                        f"pin {pin.pattern!r}: {what}={v!r}; allowed: an integer 1..8, 'float' or null"
                    )


class QuantModel(nn.Module):
    """A prepared network plus the ordered list of its quantized layers."""

    def __init__(self, net: nn.Module, layer_names: list[str], folded: list[tuple[str, str]]):
        super().__init__()
        self.net = net
        self.layer_names = layer_names
        self.folded = folded

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def layers(self) -> Iterator[tuple[str, QuantLayer]]:
        """Quantized layers in first-execution order, with their stable names."""
        modules = dict(self.net.named_modules())
        for name in self.layer_names:
            yield name, modules[name]

    def quantizers(self) -> Iterator[tuple[str, HMQQuantizer]]:
        """Every *searched* quantizer (pinned ones hold one candidate but are included)."""
        for name, layer in self.layers():
            yield f"{name}.weight", layer.wq
            yield f"{name}.input", layer.aq

    def set_state(self, state: State) -> None:
        """Put every quantizer that is not pinned to float into ``state``."""
        for _, q in self.quantizers():
            if not getattr(q, "float_pinned", False):
                q.state = state

    def set_tau(self, tau: float) -> None:
        for _, q in self.quantizers():
            q.tau.fill_(tau)

    def logit_parameters(self) -> list[nn.Parameter]:
        return [q.logits for _, q in self.quantizers()]

    def weight_parameters(self) -> list[nn.Parameter]:
        logit_ids = {id(p) for p in self.logit_parameters()}
        return [p for p in self.parameters() if id(p) not in logit_ids]


def _named_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m) for name, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear)
    ]


def _execution_order(model: nn.Module, layers: list[nn.Module], example: Tensor) -> list[int]:
    order: list[int] = []
    ids = {id(m): i for i, m in enumerate(layers)}
    handles = [
        m.register_forward_pre_hook(lambda mod, _inp: order.append(ids[id(mod)]) if ids[id(mod)] not in order else None)
        for m in layers
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _resolve_pin(name: str, spec: QuantSpec, is_first: bool) -> tuple[int | str | None, int | str | None]:
    wbits: int | str | None = None
    abits: int | str | None = spec.first_layer_act_bits if is_first else None
    for pin in spec.pins:
        if fnmatch.fnmatchcase(name, pin.pattern):
            wbits = pin.weight_bits if pin.weight_bits is not None else wbits
            abits = pin.act_bits if pin.act_bits is not None else abits
    return wbits, abits


def _make_quantizer(
    pinned: int | str | None, bits: Sequence[int], spec: QuantSpec, *, channels: int, axis: int | None
) -> HMQQuantizer:
    cand = [pinned] if isinstance(pinned, int) else list(bits)
    q = HMQQuantizer(
        cand, spec.n_thresholds, signed=True, per_channel_axis=axis, num_channels=channels, mode=spec.mode,  # type: ignore[arg-type]
        init_mass=spec.init_mass,
    )
    q.float_pinned = pinned == "float"
    return q


def prepare(model: nn.Module, spec: QuantSpec, example_input: Tensor) -> QuantModel:
    """Return a copy of ``model`` with BN folded and every Conv2d / Linear quantized.

    ``example_input`` (a small batch) is run once to find the execution order (the first
    layer is the first one called) and each layer's per-sample work for the cost models.
    """
    spec.validate()
    net = copy.deepcopy(model).eval()
    folded = fold_batchnorm(net) if spec.fold_bn else []
    named = _named_layers(net)
    if not named:
        raise UserError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    order = _execution_order(net, [m for _, m in named], example_input)
    unused = [named[i][0] for i in range(len(named)) if i not in order]
    if unused:
        log.warning("layers never called in a forward pass are left in float: %s", ", ".join(unused))
    names: list[str] = []
    for rank, idx in enumerate(order):
        name, layer = named[idx]
        wpin, apin = _resolve_pin(name, spec, is_first=rank == 0)
        axis = 0 if spec.weight_per_channel else None
        channels = layer.weight.shape[0] if spec.weight_per_channel else 1
        wq = _make_quantizer(wpin, spec.weight_bits, spec, channels=channels, axis=axis)
        aq = _make_quantizer(apin, spec.act_bits, spec, channels=1, axis=None)
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        qlayer = cls.from_float(layer, wq, aq)
        qlayer.wq.set_range(_weight_range(qlayer.weight, spec.weight_per_channel))
        qlayer.wq.init_from_data(qlayer.weight.detach())
        _replace_module(net, layer, qlayer)
        names.append(name)
    qmodel = QuantModel(net, names, folded).eval()
    record_shapes(qmodel, example_input)
    return qmodel


def _weight_range(w: Tensor, per_channel: bool) -> Tensor:
    w = w.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1) if per_channel else w.abs().max().reshape(1)


def record_shapes(qmodel: QuantModel, example_input: Tensor) -> None:
    """Record each layer's per-sample MACs and activation sizes with one float forward."""
    layers = [layer for _, layer in qmodel.layers()]
    states = {id(q): q.state for _, q in qmodel.quantizers()}
    for layer in layers:
        layer.shape = type(layer.shape)()
        layer.recording = True
    qmodel.set_state("float")
    try:
        with torch.no_grad():
            qmodel(example_input)
    finally:
        for layer in layers:
            layer.recording = False
        for _, q in qmodel.quantizers():
            q.state = states[id(q)]
