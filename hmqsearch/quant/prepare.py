"""Turn an ordinary ``nn.Module`` into one whose layers carry HMQ quantizers.

Quantized: ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Linear`` (weights and inputs), ``nn.Embedding``
(weights only, candidates ``QuantSpec.embedding_bits``), and their subclasses that keep the
base class's ``forward`` and hold nothing but a weight and a bias; ``nn.MultiheadAttention`` is
rewritten into plain modules first (:mod:`hmqsearch.quant.attention`), so its packed q/k/v
projection and its output projection are quantized Linear layers.  Every other parameter tensor
stays float and is listed, with the reason, by :meth:`QuantModel.float_parameters`.
A layer called more than once keeps one weight quantizer and one input quantizer shared by
all its call sites.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from hmqsearch.errors import UserError
from hmqsearch.inputs import Inputs, logits_of, run_model
from hmqsearch.quant.attention import DecomposedAttention, fastpath_disabled, unsupported_reason
from hmqsearch.quant.calibration import MIN_RANGE
from hmqsearch.quant.fold import _replace_module, fold_batchnorm
from hmqsearch.quant.hmq import MODES, HMQQuantizer, State
from hmqsearch.quant.layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear

log = logging.getLogger(__name__)

QuantLayer = QuantConv1d | QuantConv2d | QuantLinear | QuantEmbedding

# base type -> quantized type; a subclass of a base is matched through isinstance
_QUANT_TYPES: dict[type, type] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear, nn.Embedding: QuantEmbedding,
}
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
FLOAT_PARAM_BYTES = 4


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
    embedding_bits: Sequence[int] | None = None  # nn.Embedding tables; None: weight_bits
    n_thresholds: int = 8
    weight_per_channel: bool = True
    mode: str = "expected"
    first_layer_act_bits: int | str | None = 8
    pins: Sequence[Pin] = field(default_factory=list)
    fold_bn: bool = True
    init_mass: float = 0.95  # initial probability of the start candidate (warm_start.py)

    def validate(self) -> None:
        named = [("search.weight_bits", self.weight_bits), ("search.act_bits", self.act_bits)]
        if self.embedding_bits is not None:
            named.append(("search.embedding_bits", self.embedding_bits))
        for name, bits in named:
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


@dataclass
class FloatTensor:
    """A parameter tensor of the prepared network that stays float, and why."""

    name: str
    numel: int
    reason: str


class QuantModel(nn.Module):
    """A prepared network plus the ordered list of its quantized layers.

    Called like the network (``qmodel(x)``, ``qmodel(*x)``, ``qmodel(**x)``) it returns the
    logits, with PyTorch's fused attention fast path off so that every quantizer runs.
    ``float_reasons``: why a module's parameters stay float, by module name;
    ``model_float_bytes``: the original model's parameters at 32 bits (the whole-model reference);
    ``spec``: the QuantSpec :func:`prepare` used.
    """

    spec: QuantSpec

    def __init__(
        self, net: nn.Module, layer_names: list[str], folded: list[tuple[str, str]],
        float_reasons: dict[str, str] | None = None, model_float_bytes: int | None = None,
    ):
        super().__init__()
        self.net = net
        self.layer_names = layer_names
        self.folded = folded
        self.float_reasons = dict(float_reasons or {})
        self.model_float_bytes = model_float_bytes if model_float_bytes is not None else parameter_bytes(net)

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        with fastpath_disabled():
            return logits_of(self.net(*args, **kwargs))

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
        """Put every quantizer into ``state`` (those pinned to float stay float)."""
        for _, q in self.quantizers():
            q.state = state

    def set_tau(self, tau: float) -> None:
        for _, q in self.quantizers():
            q.tau.fill_(tau)

    def logit_parameters(self) -> list[nn.Parameter]:
        return [q.logits for _, q in self.quantizers()]

    def weight_parameters(self) -> list[nn.Parameter]:
        logit_ids = {id(p) for p in self.logit_parameters()}
        return [p for p in self.parameters() if id(p) not in logit_ids]

    def float_parameters(self) -> list[FloatTensor]:
        """Every parameter tensor of the network that is not a quantized weight, with the reason."""
        layers = dict(self.layers())
        quantizer_ids = {id(p) for _, q in self.quantizers() for p in q.parameters()}
        out = []
        for pname, p in self.net.named_parameters():
            if id(p) in quantizer_ids:
                continue
            owner, _, leaf = pname.rpartition(".")
            layer = layers.get(owner)
            if layer is not None:
                if leaf == "weight" and not layer.wq.float_pinned:
                    continue
                reason = (
                    "weights pinned to float (search.pins)" if leaf == "weight"
                    else "bias of a quantized layer (32-bit, on its accumulator grid)"
                )
            else:
                reason = self._module_reason(owner)
            out.append(FloatTensor(pname, p.numel(), reason))
        return out

    def _module_reason(self, owner: str) -> str:
        path = owner
        while True:
            if path in self.float_reasons:
                return self.float_reasons[path]
            if not path:
                break
            path = path.rpartition(".")[0]
        module = self.net.get_submodule(owner)
        if isinstance(module, _NORMS):
            return f"normalization ({type(module).__name__}) parameter, kept in float"
        return (
            f"parameter of {type(module).__name__} used by its own forward "
            "(not a Conv1d/Conv2d/Linear/Embedding weight)"
        )


def parameter_bytes(model: nn.Module) -> int:
    """float32 bytes of ``model``'s parameters (a tensor shared by several modules counted once)."""
    return FLOAT_PARAM_BYTES * sum(p.numel() for p in model.parameters())


def _base_type(m: nn.Module) -> type | None:
    return next((base for base in _QUANT_TYPES if isinstance(m, base)), None)


def _not_quantizable(m: nn.Module, base: type) -> str | None:
    """Why a module of a quantizable base type is left float, or None."""
    kind = type(m).__name__
    if type(m).forward is not base.forward:
        return f"{kind} overrides {base.__name__}.forward, so its computation is not known to hmqsearch"
    extra = sorted({n for n, _ in m.named_parameters(recurse=False)} - {"weight", "bias"})
    if extra or any(True for _ in m.children()):
        return f"{kind} holds more than a weight and a bias ({', '.join(extra) or 'child modules'})"
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode != "zeros":
        return f"{kind} with padding_mode={m.padding_mode!r} cannot be exported (only 'zeros')"
    if isinstance(m, nn.Embedding) and m.max_norm is not None:
        return f"{kind} with max_norm renormalises its table in place"
    return None


def _decompose_attention(net: nn.Module, reasons: dict[str, str]) -> None:
    """Replace every supported nn.MultiheadAttention by a DecomposedAttention (in place)."""
    for name, m in list(net.named_modules()):
        if not isinstance(m, nn.MultiheadAttention):
            continue
        reason = unsupported_reason(m)
        if type(m).forward is not nn.MultiheadAttention.forward:
            reason = f"{type(m).__name__} overrides nn.MultiheadAttention.forward"
        if reason is not None:
            reasons[name] = reason
            continue
        _replace_module(net, m, DecomposedAttention(m))


def _candidates(net: nn.Module, reasons: dict[str, str]) -> list[tuple[str, nn.Module]]:
    """The layers to quantize; the others of a quantizable type get a reason."""
    out = []
    for name, m in net.named_modules():
        base = _base_type(m)
        if base is None or any(name.startswith(f"{r}.") for r in reasons):
            continue
        reason = _not_quantizable(m, base)
        if reason is None:
            out.append((name, m))
        else:
            reasons[name] = reason
    return out


def _check_untied(net: nn.Module, named: list[tuple[str, nn.Module]]) -> None:
    """Refuse a layer whose weight is also a parameter of another module (tied weights)."""
    owners: dict[int, list[str]] = {}
    for mname, m in net.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    for name, layer in named:
        names = owners[id(layer.weight)]
        if len(names) > 1:
            others = [n for n in names if n != f"{name}.weight"]
            raise UserError(
                f"{name}.weight is the same tensor as {', '.join(others)} (tied weights); hmqsearch quantizes each "
                f"layer's weight on its own: untie them first, e.g. model.{name}.weight = "
                f"nn.Parameter(model.{name}.weight.detach().clone())"
            )


def _execution_order(model: nn.Module, layers: list[nn.Module], example: Inputs) -> list[int]:
    order: list[int] = []
    ids = {id(m): i for i, m in enumerate(layers)}
    handles = [
        m.register_forward_pre_hook(lambda mod, _inp: order.append(ids[id(mod)]) if ids[id(mod)] not in order else None)
        for m in layers
    ]
    try:
        with torch.no_grad(), fastpath_disabled():
            run_model(model, example)
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
    return HMQQuantizer(
        cand, spec.n_thresholds, signed=True, per_channel_axis=axis, num_channels=channels, mode=spec.mode,  # type: ignore[arg-type]
        init_mass=spec.init_mass, float_pinned=pinned == "float",
    )


def prepare(model: nn.Module, spec: QuantSpec, example_input: Inputs) -> QuantModel:
    """Return a copy of ``model`` with BN folded and every supported layer quantized.

    ``example_input`` (a small batch: a tensor, a tuple or a dict of tensors, see
    :mod:`hmqsearch.inputs`) is run once to find the execution order (the first layer is the
    first one called) and each layer's per-sample work for the cost models.
    """
    spec.validate()
    net = copy.deepcopy(model).eval()
    folded = fold_batchnorm(net) if spec.fold_bn else []
    reasons: dict[str, str] = {}
    _decompose_attention(net, reasons)
    named = _candidates(net, reasons)
    if not named:
        raise UserError(f"{type(model).__name__} has no Conv1d, Conv2d, Linear or Embedding layer to quantize")
    _check_untied(net, named)
    order = _execution_order(net, [m for _, m in named], example_input)
    unused = [named[i][0] for i in range(len(named)) if i not in order]
    if unused:
        log.warning("layers never called in a forward pass are left in float: %s", ", ".join(unused))
        reasons.update({name: "layer never called in the example forward pass" for name in unused})
    names: list[str] = []
    first_input = next((named[i][0] for i in order if not isinstance(named[i][1], nn.Embedding)), None)
    for idx in order:
        name, layer = named[idx]
        is_embedding = isinstance(layer, nn.Embedding)
        wpin, apin = _resolve_pin(name, spec, is_first=name == first_input)
        axis = 0 if spec.weight_per_channel else None
        channels = layer.weight.shape[0] if spec.weight_per_channel else 1
        wbits = spec.embedding_bits if is_embedding and spec.embedding_bits is not None else spec.weight_bits
        wq = _make_quantizer(wpin, wbits, spec, channels=channels, axis=axis)
        aq = _make_quantizer("float" if is_embedding else apin, spec.act_bits, spec, channels=1, axis=None)
        qlayer = _QUANT_TYPES[_base_type(layer)].from_float(layer, wq, aq)
        qlayer.wq.set_range(_weight_range(qlayer.weight, spec.weight_per_channel))
        qlayer.wq.init_from_data(qlayer.weight.detach())
        _replace_module(net, layer, qlayer)
        names.append(name)
    qmodel = QuantModel(net, names, folded, reasons, parameter_bytes(model)).eval()
    qmodel.spec = spec
    record_shapes(qmodel, example_input)
    _log_float_parameters(qmodel)
    return qmodel


def _log_float_parameters(qmodel: QuantModel) -> None:
    tensors = qmodel.float_parameters()
    by_reason: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for t in tensors:
        by_reason[t.reason] += t.numel
        count[t.reason] += 1
    for reason, numel in by_reason.most_common():
        log.info("float parameters: %d tensor(s), %d values: %s", count[reason], numel, reason)


def _weight_range(w: Tensor, per_channel: bool) -> Tensor:
    """Per-channel (or whole-tensor) max |w|, at least MIN_RANGE (an all-zero row, e.g. an
    embedding's padding row, keeps its threshold exponents within an int8)."""
    w = w.detach()
    r = w.abs().reshape(w.shape[0], -1).amax(1) if per_channel else w.abs().max().reshape(1)
    return r.clamp(min=MIN_RANGE)


def record_shapes(qmodel: QuantModel, example_input: Inputs) -> None:
    """Record each layer's per-sample MACs and activation sizes with one float forward."""
    layers = [layer for _, layer in qmodel.layers()]
    states = {id(q): q.state for _, q in qmodel.quantizers()}
    for layer in layers:
        layer.shape = type(layer.shape)()
        layer.recording = True
    qmodel.set_state("float")
    try:
        with torch.no_grad():
            run_model(qmodel, example_input)
    finally:
        for layer in layers:
            layer.recording = False
        for _, q in qmodel.quantizers():
            q.state = states[id(q)]
