"""The HMQ block: a quantizer whose scheme is a learned categorical over (bit-width, threshold).

Habi, Jennings, Netzer, "HMQ: Hardware Friendly Mixed Precision Quantization Block for CNNs"
(ECCV 2020).  Each quantizer holds logits ``alpha`` over the grid bits x thresholds.  During the
search a Gumbel-Softmax sample ``pi = softmax((alpha + g) / tau)`` mixes the candidates; the
default forward quantizes once with the *expected* step and clipping bounds under ``pi``.  In
evaluation (or once the assignment is frozen) the argmax scheme is used, without noise.

Threshold candidates are powers of two around a range estimate r (per tensor, or per output
channel for weights): with M = ceil(log2 r), t_j = 2^(M + 1 - j) for j = 0 .. n_t - 1.  With
per-channel weights the logits are shared by all channels and select the offset j, so every
channel keeps its own power-of-two threshold.

A signed 1-bit candidate is the symmetric binary grid +-t/2
(:func:`hmqsearch.quant.functional.binary_quant`), not the degenerate integer grid {-1, 0}.
The expected-step relaxation cannot express it (a mid-rise grid has no zero level), so when a
quantizer has binary candidates the relaxed forward mixes two passes: the expected-step
quantizer over the other candidates and the binary quantizer at the binary row's expected
step, weighted by their probability masses.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from hmqsearch.kernels import fake_quant
from hmqsearch.kernels.torch_impl import channel_view
from hmqsearch.quant.autocast import float32_under_autocast
from hmqsearch.quant.functional import binary_quant
from hmqsearch.quant.scheme import Scheme

Mode = Literal["expected", "mixture", "hard", "argmax"]
State = Literal["float", "search", "fixed"]
MODES: tuple[str, ...] = ("expected", "mixture", "hard", "argmax")
ROW_PRIOR = 4.0  # nats of prior on each bit-width's preferred threshold


@contextmanager
def argmax_costs(quantizers: Iterable["HMQQuantizer"]) -> Iterator[None]:
    """Inside, every quantizer's :meth:`HMQQuantizer.bit_probs` is the one-hot of its argmax:
    the expected-cost functions then compute the argmax's cost on the device (no host read)."""
    quantizers = list(quantizers)
    for q in quantizers:
        q.argmax_costs = True
    try:
        yield
    finally:
        for q in quantizers:
            q.argmax_costs = False


class HMQQuantizer(nn.Module):
    """Learned (bit-width, power-of-two threshold) quantizer.

    ``state`` selects the behaviour: ``"float"`` passes the input through, ``"search"`` samples
    with Gumbel-Softmax in training mode (argmax in eval mode), ``"fixed"`` always uses the
    argmax scheme (fine-tuning, export).  A quantizer built with ``float_pinned=True`` (a tensor
    the model leaves float) stays in ``"float"`` whatever state it is put in.
    """

    def __init__(
        self,
        bits: Sequence[int],
        n_thresholds: int = 8,
        *,
        signed: bool = True,
        per_channel_axis: int | None = None,
        num_channels: int = 1,
        mode: Mode = "expected",
        init_mass: float = 0.95,
        float_pinned: bool = False,
    ) -> None:
        super().__init__()
        if not bits:
            raise ValueError("bits must list at least one bit-width")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
        self.mode: Mode = mode
        self._float_pinned = float_pinned
        self._state: State = "float"
        self.register_buffer("signed_flag", torch.tensor(signed))
        self.per_channel_axis = per_channel_axis
        self.register_buffer("bits", torch.tensor(sorted(set(bits)), dtype=torch.float32))
        self.candidate_bits: tuple[int, ...] = tuple(sorted({int(b) for b in bits}))  # `bits` read without a GPU sync
        self.register_buffer("base_exp", torch.zeros(num_channels))
        self.register_buffer("tau", torch.tensor(1.0))
        self.n_thresholds = n_thresholds
        self.init_mass = init_mass
        self.argmax_costs = False  # see bit_probs
        self.logits = nn.Parameter(self._initial_logits(init_mass))

    # ---------------------------------------------------------------- state
    @property
    def float_pinned(self) -> bool:
        """Whether the tensor stays float: the quantizer never quantizes and has no scheme."""
        return self._float_pinned

    @property
    def state(self) -> State:
        return "float" if self._float_pinned else self._state

    @state.setter
    def state(self, value: State) -> None:
        self._state = value

    # ----------------------------------------------------------------- grid
    @property
    def signed(self) -> bool:
        """Signed grid (weights, activations that can be negative) or unsigned (after ReLU)."""
        return bool(self.signed_flag)

    @signed.setter
    def signed(self, value: bool) -> None:
        self.signed_flag.fill_(bool(value))

    @property
    def num_candidates(self) -> int:
        return self.logits.numel()

    def _initial_logits(self, init_mass: float, best: Tensor | None = None, start_row: int = -1) -> Tensor:
        """Logits with ``init_mass`` on bit-width row ``start_row`` (default: the highest).

        Inside every bit-width row the threshold ``best[b]`` (default: the widest) gets a prior
        of ROW_PRIOR nats.  The mass the dual ascent later moves to another bit-width keeps
        each row's internal proportions, so this prior decides which threshold a moved layer
        lands on: :meth:`init_from_data` sets it to the lowest-MSE threshold.
        """
        n_b, n_t = len(self.bits), self.n_thresholds
        best = torch.zeros(n_b, dtype=torch.long) if best is None else best.cpu()
        logits = torch.zeros(n_b, n_t)
        logits[torch.arange(n_b), best] = ROW_PRIOR if n_t > 1 else 0.0
        if logits.numel() > 1:
            row = start_row % n_b
            others = torch.exp(logits).sum() - torch.exp(logits[row, best[row]])
            logits[row, best[row]] = math.log(init_mass * float(others) / (1.0 - init_mass))
        return logits

    def reset_logits(self) -> None:
        with torch.no_grad():
            self.logits.copy_(self._initial_logits(self.init_mass))

    @torch.no_grad()
    def candidate_mse(self, x: Tensor) -> Tensor:
        """Quantization MSE of every (bits, threshold) candidate on ``x``, shape (bits, thresholds)."""
        step, lo, hi = self.candidate_tables()
        binary = self.binary_mask().tolist()
        mse = torch.stack([
            ((self._binary(x, step[k]) if binary[k] else self._quant(x, step[k], lo[k], hi[k])) - x).pow(2).mean()
            for k in range(len(step))
        ])
        return mse.reshape(self.logits.shape)

    def init_from_data(self, x: Tensor) -> None:
        """Initialise the logits with each bit-width's lowest-MSE threshold on ``x`` preferred."""
        best = self.candidate_mse(x).argmin(1)
        with torch.no_grad():
            self.logits.copy_(self._initial_logits(self.init_mass, best).to(self.logits.device))

    def set_range(self, r: Tensor | float) -> None:
        """Centre the threshold grid on range estimate(s) ``r``: M = ceil(log2 r)."""
        r = torch.as_tensor(r, dtype=torch.float32, device=self.base_exp.device).reshape(-1)
        r = torch.clamp(r, min=torch.finfo(torch.float32).tiny)
        self.base_exp.copy_(torch.ceil(torch.log2(r)).expand_as(self.base_exp))

    def threshold_table(self) -> Tensor:
        """Thresholds t[c, j] = 2^(M_c + 1 - j), shape (channels, n_t)."""
        offsets = torch.arange(self.n_thresholds, device=self.base_exp.device, dtype=torch.float32)
        return torch.exp2(self.base_exp[:, None] + 1.0 - offsets[None, :])

    @property
    def has_binary_rows(self) -> bool:
        """Whether a 1-bit candidate exists (binary when the quantizer is signed)."""
        return self.candidate_bits[0] == 1

    def _binary_bits(self) -> Tensor:
        """Per bit-width row: True for the binary grid (signed 1-bit). Arithmetic on the flag, not
        `self.signed`: a host read would wait for the GPU every forward."""
        return (self.bits == 1) & self.signed_flag

    def _shift(self) -> Tensor:
        return self.bits - self.signed_flag.to(self.bits.dtype) + self._binary_bits().to(self.bits.dtype)

    def binary_mask(self) -> Tensor:
        """(K,) bool: the candidates on the binary grid, flattened bits-major like the tables."""
        return self._binary_bits()[:, None].expand(-1, self.n_thresholds).reshape(-1)

    def candidate_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per-candidate (step, lo, hi), each shaped (K, channels), K = bits x thresholds.
        Binary candidates have step t / 2 and the clipping range [-t, t]."""
        t = self.threshold_table()  # (C, T)
        step = t[None, :, :] / torch.exp2(self._shift())[:, None, None]  # (B, C, T)
        hi = torch.where(self._binary_bits()[:, None, None], t[None], t[None] - step)
        lo = torch.where(self.signed_flag, -t[None].expand_as(step), torch.zeros_like(step))
        flat = lambda v: v.permute(0, 2, 1).reshape(-1, v.shape[1])  # noqa: E731 (B,T) major
        return flat(step), flat(lo), flat(hi)

    # -------------------------------------------------------- distributions
    def probs(self) -> Tensor:
        """Deterministic candidate probabilities softmax(alpha), flattened (bits-major)."""
        return torch.softmax(self.logits.reshape(-1), dim=0)

    def bit_probs(self) -> Tensor:
        """Marginal probability of each bit-width; inside :func:`argmax_costs`, the one-hot of
        the argmax's bit-width (so every expected cost becomes the argmax's exact cost)."""
        if self.argmax_costs:
            row = torch.div(self._chosen_row(), self.n_thresholds, rounding_mode="floor")
            return torch.zeros_like(self.bits).scatter_(0, row, 1.0)
        return torch.softmax(self.logits.reshape(-1), dim=0).reshape(self.logits.shape).sum(1)

    def expected_bits(self) -> Tensor:
        return (self.bit_probs() * self.bits).sum()

    def sample(self) -> Tensor:
        """Gumbel-Softmax weights over the candidates.

        ``hard``: the forward uses the one-hot of the sample; ``argmax``: the one-hot of the
        logits' argmax, without noise, so the weights train at the assignment the search would
        end on.  Both pass the soft sample's gradient to the logits (straight through).
        ``torch.nn.functional.gumbel_softmax`` with the temperature kept a tensor: reading it
        on the host would wait for the GPU in every forward.
        """
        logits = self.logits.reshape(-1)
        gumbels = -torch.empty_like(logits).exponential_().log()
        soft = ((logits + gumbels) / self.tau).softmax(0)
        if self.mode == "hard":
            chosen = soft.argmax(0, keepdim=True)
        elif self.mode == "argmax":
            chosen = self._chosen_row()
        else:
            return soft
        hard = torch.zeros_like(soft).scatter_(0, chosen, 1.0)
        return hard - soft.detach() + soft

    def chosen_index(self) -> tuple[int, int]:
        """(bit index, threshold index) of the argmax candidate."""
        return divmod(int(self._chosen_row()), self.n_thresholds)

    def scheme_at(self, bits: int, threshold_index: int | None = None) -> Scheme:
        """Candidate (``bits``, t_j) as a scheme; ``threshold_index`` None: that bit-width's
        preferred threshold (the highest logit of its row)."""
        b = self._bit_index(bits)
        j = int(self.logits.detach()[b].argmax()) if threshold_index is None else threshold_index
        if not 0 <= j < self.n_thresholds:
            raise ValueError(f"threshold index {j} is not on this grid of {self.n_thresholds} thresholds")
        exps = (self.base_exp + 1 - j).round().to(torch.int64).tolist()
        return Scheme(bits, self.signed, tuple(int(e) for e in exps), self.per_channel_axis is not None)

    def argmax(self) -> Scheme | None:
        """The argmax candidate as a scheme; None when the quantizer is pinned to float."""
        if self.float_pinned:
            return None
        b, j = self.chosen_index()
        return self.scheme_at(self.candidate_bits[b], j)

    def fix(self, scheme: Scheme | None, *, start: bool = False) -> None:
        """Make ``scheme`` the argmax: the one way an assignment is written into the logits.

        The other candidates keep their logits (the search's margins and second choices stay
        readable); ``start=True`` writes the search's initial logits instead, ``init_mass`` on
        ``scheme`` and each other bit-width's preferred threshold keeping its prior.  Thresholds
        off the grid re-centre it on the scheme's (a precision file from another calibration).
        None (float) is the only scheme of a quantizer pinned to float, and only there.
        """
        if (scheme is None) != self.float_pinned:
            raise ValueError("float given but the model quantizes this tensor" if scheme is None
                             else f"{scheme.bits} bits given but the tensor is pinned to float")
        if scheme is None:
            return
        b, j = self._candidate_index(scheme)
        with torch.no_grad():
            if start:
                best = self.logits.detach().argmax(1)
                best[b] = j
                self.logits.copy_(self._initial_logits(self.init_mass, best, b).to(self.logits.device))
            else:
                self.logits[b, j] = self.logits.max() + 1.0

    def _bit_index(self, bits: int) -> int:
        if bits not in self.candidate_bits:
            raise ValueError(f"bits={bits} is not a candidate here (allowed {list(self.candidate_bits)})")
        return self.candidate_bits.index(bits)

    def _candidate_index(self, scheme: Scheme) -> tuple[int, int]:
        """(bit index, threshold index) of ``scheme``, taking over its signedness, and its
        thresholds as the grid's when they are not on it."""
        b = self._bit_index(scheme.bits)
        channels = self.base_exp.numel()
        if len(scheme.threshold_exp) not in (1, channels):
            raise ValueError(f"{len(scheme.threshold_exp)} threshold exponents for {channels} channels")
        exps = torch.tensor(scheme.threshold_exp, dtype=torch.float32, device=self.base_exp.device)
        offsets = set((self.base_exp + 1 - exps).tolist())
        j = offsets.pop() if len(offsets) == 1 else None
        if j is None or not j.is_integer() or not 0 <= j < self.n_thresholds:
            self.base_exp.copy_((exps - 1.0).expand_as(self.base_exp))
            j = 0.0
        self.signed = scheme.signed
        return b, int(j)

    def is_discrete(self) -> bool:
        """True when the forward pass applies the argmax scheme (fixed state, or search in eval)."""
        return self.state == "fixed" or (self.state == "search" and not self.training)

    def _chosen_row(self) -> Tensor:
        """Flat index of the argmax candidate as a 1-element tensor on the quantizer's device;
        indexing with it, unlike :meth:`chosen_index`, does not wait for the GPU."""
        return torch.argmax(self.logits.reshape(-1)).reshape(1)

    def discrete_steps(self) -> Tensor:
        """Steps of the argmax scheme, one per channel, on the quantizer's device."""
        return self.candidate_tables()[0].index_select(0, self._chosen_row())[0]

    # -------------------------------------------------------------- forward
    @float32_under_autocast
    def forward(self, x: Tensor) -> Tensor:
        if self.state == "float":
            return x
        if self.state == "search" and self.training:
            return self._relaxed(x, self.sample())
        return self._discrete(x)

    def _axis(self, x: Tensor) -> int | None:
        if self.per_channel_axis is None:
            return None
        return self.per_channel_axis % x.dim()

    def _quant(self, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        axis = self._axis(x)
        if axis is None:
            return fake_quant(x, step.reshape(()), lo.reshape(()), hi.reshape(()), None)
        return fake_quant(x, step, lo, hi, axis)

    def _binary(self, x: Tensor, step: Tensor) -> Tensor:
        axis = self._axis(x)
        return binary_quant(x, step.reshape(()) if axis is None else channel_view(step, x.dim(), axis))

    def _relaxed(self, x: Tensor, pi: Tensor) -> Tensor:
        step, lo, hi = self.candidate_tables()
        if self.mode == "mixture":
            binary = self.binary_mask().tolist() if self.has_binary_rows else [False] * pi.numel()
            out = torch.zeros_like(x)
            for k in range(pi.numel()):
                q = self._binary(x, step[k]) if binary[k] else self._quant(x, step[k], lo[k], hi[k])
                out = out + pi[k] * q
            return out
        if not self.has_binary_rows:
            return self._quant(x, pi @ step, pi @ lo, pi @ hi)
        if len(self.candidate_bits) == 1:  # 1 bit only: binary when signed, {0, 1} otherwise
            return torch.where(self.signed_flag, self._binary(x, pi @ step), self._quant(x, pi @ step, pi @ lo, pi @ hi))
        binary = self.binary_mask().to(pi.dtype)
        p_bin = (pi * binary).sum()
        p_rest = (1.0 - p_bin).clamp_min(0.0)
        rest = (pi + 1e-12) * (1.0 - binary)  # never all zero: a zero expected step would give NaN
        rest = rest / rest.sum()
        binary_step = (pi * binary) @ step / p_bin.clamp_min(1e-12)
        return p_rest * self._quant(x, rest @ step, rest @ lo, rest @ hi) + p_bin * self._binary(x, binary_step)

    def _discrete(self, x: Tensor) -> Tensor:
        k = self._chosen_row()
        step, lo, hi = (v.index_select(0, k)[0] for v in self.candidate_tables())
        out = self._quant(x, step, lo, hi)
        if self.has_binary_rows:  # both computed: choosing on the host would wait for the GPU
            out = torch.where(self.binary_mask().index_select(0, k)[0], self._binary(x, step), out)
        return out

    def extra_repr(self) -> str:
        return (
            f"bits={list(self.candidate_bits)}, n_thresholds={self.n_thresholds}, "
            f"signed={self.signed}, per_channel_axis={self.per_channel_axis}, mode={self.mode}"
        )
