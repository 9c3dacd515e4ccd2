"""Activation range calibration: signedness and threshold grids of the input quantizers."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from hmqsearch.errors import UserError
from hmqsearch.inputs import Inputs, run_model, to_device
from hmqsearch.quant.calibration import RangeObserver
from hmqsearch.quant.prepare import QuantModel


SAMPLE_PER_BATCH = 16384  # input values kept per layer and batch to rank the threshold candidates


def _observe_input(obs: RangeObserver, samples: list[Tensor], generator: torch.Generator):  # noqa: ANN202
    def hook(_module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
        x = obs(args[0]).detach().flatten()
        if x.numel() > SAMPLE_PER_BATCH:
            x = x[torch.randint(0, x.numel(), (SAMPLE_PER_BATCH,), generator=generator, device="cpu").to(x.device)]
        samples.append(x)

    return hook


@torch.no_grad()
def calibrate_activations(
    qmodel: QuantModel, batches: Sequence[Inputs], method: str = "max", percentile: float = 99.99
) -> dict[str, float]:
    """Observe each layer's input on float forwards and centre its threshold grid on the range.

    An input that is never negative on the calibration data gets an unsigned grid (one more
    bit of resolution, as after a ReLU).  Each bit-width's lowest-MSE threshold on a sample
    of the inputs becomes that row's preferred threshold in the initial logits.  Returns the
    calibrated range per layer (layers whose input holds indices, embeddings, have none).
    """
    layers = [(name, layer) for name, layer in qmodel.layers() if layer.quantizes_input]
    observers = {name: RangeObserver() for name, _ in layers}
    samples: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    gen = torch.Generator().manual_seed(0)
    handles = [
        layer.register_forward_pre_hook(_observe_input(observers[name], samples[name], gen))
        for name, layer in layers
    ]
    states = {id(q): q.state for _, q in qmodel.quantizers()}
    was_training = qmodel.training
    qmodel.eval().set_state("float")
    device = next(qmodel.parameters()).device
    try:
        for x in batches:
            run_model(qmodel, to_device(x, device))
    finally:
        for h in handles:
            h.remove()
        for _, q in qmodel.quantizers():
            q.state = states[id(q)]
        qmodel.train(was_training)
    ranges = {}
    for name, layer in layers:
        obs = observers[name]
        bits = int(layer.aq.bits.max())
        layer.aq.signed = obs.signed
        if obs.signed and 1 in layer.aq.candidate_bits and not layer.aq.float_pinned:
            raise UserError(
                f"the input of layer {name} can be negative, so a 1-bit input would be the binary grid "
                f"{{-t/2, +t/2}}, which the deployment graph cannot express; allowed: 1 in search.act_bits "
                f"only where every searched input is non-negative (after a ReLU), or pin this input "
                f"(search.pins=[{{pattern: {name}, act_bits: 8}}])"
            )
        ranges[name] = obs.compute_range(method, bits=bits, percentile=percentile)
        layer.aq.set_range(ranges[name])
        layer.aq.init_from_data(torch.cat(samples[name]))
    return ranges
