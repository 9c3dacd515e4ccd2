"""Range calibration (Wu et al., arXiv 2004.09602, section 4): max, percentile, MSE, entropy.

A :class:`RangeObserver` watches a tensor stream (called directly or as a forward hook) and
keeps running min/max and a histogram of |x|.  :func:`compute_range` turns a histogram into
a clipping range r > 0, the threshold on |x| that the power-of-two threshold grid is then
centred on (``M = pot_ceil(r)``, see :mod:`hmqsearch.quant.hmq`).

Ranges are never below :data:`MIN_RANGE`: an all-zero stream calibrates to ``MIN_RANGE``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

METHODS = ("max", "percentile", "mse", "entropy")

MIN_RANGE = 2.0**-26
"""Smallest range returned (about 1.5e-8), e.g. for an all-zero tensor.  A power of two, so
the threshold grid sits exactly on it and the steps derived from it (2^-26 / 2^(b-1) and a
few octaves below) are still normal float32 numbers, which hardware does not flush to zero."""

_MSE_CANDIDATES = 256  # coarse MSE search: a few hundred ranges x num_bins bins, evaluated at once


def pot_ceil(r: float) -> int:
    """M = ceil(log2 r): 2^M is the smallest power of two >= r (exact, also at powers of two)."""
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"pot_ceil needs a finite range > 0, got {r}")
    mantissa, exp = math.frexp(r)  # r = mantissa * 2^exp with 0.5 <= mantissa < 1
    return exp - 1 if mantissa == 0.5 else exp


def _check_method(method: str) -> None:
    if method not in METHODS:
        allowed = ", ".join(repr(m) for m in METHODS)
        raise ValueError(f"unknown calibration method {method!r}; allowed: {allowed}")


def compute_range(
    hist: Tensor, edges_max: float, method: str, *, bits: int, signed: bool, percentile: float = 99.99
) -> float:
    """Clipping range r from a histogram ``hist`` of |x| with equal bins over [0, edges_max].

    * ``"max"``: the top edge of the last non-empty bin.
    * ``"percentile"``: the ``percentile``-th percentile of |x|, linear inside its bin.
    * ``"mse"``: the bin edge minimising the quantization MSE, see :func:`_mse_range`.
    * ``"entropy"``: TensorRT's KL-divergence threshold, see :func:`_entropy_range`.

    ``bits`` and ``signed`` select the integer grid of :mod:`hmqsearch.quant.functional`
    (they only matter for ``"mse"`` and ``"entropy"``; for those, take exact zeros out of
    bin 0 as :meth:`RangeObserver.compute_range` does).  An empty histogram gives MIN_RANGE.
    """
    _check_method(method)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits={bits!r}; allowed: an integer >= 1")
    counts = hist.detach().to(device="cpu", dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0 or bool((counts < 0).any()):
        raise ValueError(f"hist must be a non-empty 1-D tensor of non-negative counts, got shape {tuple(hist.shape)}")
    if not (math.isfinite(edges_max) and edges_max > 0):
        raise ValueError(f"edges_max must be finite and > 0, got {edges_max}")
    if method == "percentile" and not 0 < percentile <= 100:
        raise ValueError(f"percentile={percentile}; allowed: 0 < percentile <= 100")
    if counts.sum() == 0:
        return MIN_RANGE
    width = edges_max / counts.numel()
    if method == "max":
        r = width * (int(counts.nonzero().max()) + 1)
    elif method == "percentile":
        r = _percentile(counts, width, percentile)
    elif method == "mse":
        r = _mse_range(counts, width, bits, signed)
    else:
        r = _entropy_range(counts, width, bits, signed)
    return max(r, MIN_RANGE)


def _percentile(counts: Tensor, width: float, percentile: float) -> float:
    cdf = counts.cumsum(0)
    target = float(cdf[-1]) * percentile / 100
    k = min(int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))), counts.numel() - 1)
    below = float(cdf[k] - counts[k])
    return width * (k + (target - below) / float(counts[k]))


def _rounding_sq_integral(y: Tensor, step: Tensor) -> Tensor:
    """Integral over [0, y] of (t - step * round(t / step))^2 dt (a sawtooth squared)."""
    s = y / step + 0.5
    periods = torch.floor(s)
    frac = s - periods
    return step**3 * (periods / 12 + ((frac - 0.5) ** 3 + 0.125) / 3 - 1 / 24)


def _error_integral(x: Tensor, clip: Tensor, step: Tensor) -> Tensor:
    """Integral over [0, x] of the squared error of rounding to multiples of step, clipped at clip."""
    return _rounding_sq_integral(torch.minimum(x, clip), step) + torch.clamp(x - clip, min=0) ** 3 / 3


def _mse_range(counts: Tensor, width: float, bits: int, signed: bool) -> float:
    """The bin edge r minimising the expected squared error of fake quantization with range r.

    The grid is that of functional.py: step d = r / 2^(b-1) signed, r / 2^b unsigned; a
    value is rounded to the nearest multiple of d up to the clipping bound and clipped
    beyond it.  The positive bound is (2^(b-1) - 1) d = r - d (signed) or (2^b - 1) d = r - d
    (unsigned), the negative bound -r.  The error is integrated exactly over each bin,
    assuming values are uniform inside a bin (no d^2/12 noise model, which is poor when d
    is not small against the spread of the data, as at 2-4 bits).  The |x| histogram has no
    sign, so for a signed grid half of each bin is taken to clip at r - d and half at r:
    exact for symmetric distributions.  Unsigned grids assume non-negative data.

    Search: every ``stride``-th edge (about _MSE_CANDIDATES of them), then every edge within
    a stride of the best one.
    """
    n = counts.numel()
    stride = max(1, n // _MSE_CANDIDATES)
    best = _argmin_mse(counts, width, bits, signed, torch.arange(stride, n + 1, stride))
    around = torch.arange(max(1, best - stride + 1), min(n, best + stride - 1) + 1)
    return width * _argmin_mse(counts, width, bits, signed, around)


def _argmin_mse(counts: Tensor, width: float, bits: int, signed: bool, candidates: Tensor) -> int:
    """The candidate range (in bins) of least quantization error, see :func:`_mse_range`."""
    lo = torch.arange(counts.numel(), dtype=torch.float64) * width
    hi = lo + width
    r = candidates.double()[:, None] * width
    step = r / 2 ** (bits - 1 if signed else bits)
    bounds = ((0.5, r - step), (0.5, r)) if signed else ((1.0, r - step),)
    err = sum(
        weight * (counts * (_error_integral(hi, clip, step) - _error_integral(lo, clip, step))).sum(1)
        for weight, clip in bounds
    )
    return int(candidates[int(err.argmin())])


def _entropy_range(counts: Tensor, width: float, bits: int, signed: bool) -> float:
    """TensorRT's KL calibration (Migacz, GTC 2017), vectorised over all candidate thresholds.

    For i = L .. n bins, with L = 2^(b-1) quantization levels (2^b unsigned; 128 for int8):
    the reference P = counts[:i] with the outliers sum(counts[i:]) folded into bin i-1; the
    candidate Q = counts[:i] merged into L levels (bin j goes to level floor(j L / i)), each
    level's mass spread evenly over its non-zero bins.  Q is built from the bins *before*
    the outliers are folded in, as TensorRT does: built from P, Q would equal P at i = L and
    the divergence would always pick the narrowest threshold.  Returns the edge i * width of
    the i minimising KL(P || Q); ties go to the widest threshold (clip less).

    With T = sum(counts), T_i = sum(counts[:i]), c the counts of P, S_k and N_k the mass and
    non-zero bins of level k of Q and C_k the mass of P over the same bins,
    KL = (sum_j c_j log c_j - sum_k C_k log(S_k / N_k)) / T - log T + log T_i: cumulative sums
    give every candidate at once.  KL is infinite where the outliers are folded into an
    empty bin, to which Q gives no mass.
    """
    n = counts.numel()
    levels = 2 ** (bits - 1 if signed else bits)
    if n <= levels:  # too few bins to clip anything at this precision
        return n * width
    zero = torch.zeros(1, dtype=torch.float64)
    cum = torch.cat([zero, counts.cumsum(0)])
    cum_nonzero = torch.cat([zero, (counts > 0).double().cumsum(0)])
    cum_clogc = torch.cat([zero, torch.xlogy(counts, counts).cumsum(0)])
    total = cum[-1]

    i = torch.arange(levels, n + 1)
    outliers = total - cum[i]
    last = counts[i - 1] + outliers  # bin i-1 of P
    plogp = cum_clogc[i - 1] + torch.xlogy(last, last)

    k = torch.arange(levels + 1)
    bounds = (k[None, :] * i[:, None] + levels - 1) // levels  # ceil(k i / L): level k = bins [b_k, b_k+1)
    q_mass = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]
    q_nonzero = cum_nonzero[bounds[:, 1:]] - cum_nonzero[bounds[:, :-1]]
    p_mass = q_mass.clone()
    p_mass[:, -1] += outliers
    plogq = torch.xlogy(p_mass, q_mass / q_nonzero.clamp(min=1)).sum(1)
    kl = (plogp - plogq) / total - torch.log(total) + torch.log(cum[i])
    kl[(counts[i - 1] == 0) & (outliers > 0)] = math.inf  # Q is 0 on bin i-1, P is not
    best = n - levels - int(kl.flip(0).argmin())  # last argmin: the widest of tied thresholds
    return float(i[best]) * width


class RangeObserver(torch.nn.Module):
    """Collects statistics of a tensor stream for range calibration.

    Records, over finite values only (non-finite ones are counted in ``num_nonfinite``):
    running min and max, per channel too when ``per_channel_axis`` is set, and a histogram
    of |x| with ``num_bins`` bins over [0, R].  R starts at the first batch's absmax (at
    least MIN_RANGE) and, when a larger value arrives, is doubled k times while groups of 2^k adjacent bins are
    merged.  The re-binning is exact (no interpolation: the counts equal a one-shot histogram
    on the coarser grid), so results barely depend on batch order; the price is that between
    num_bins / 2 and num_bins bins cover [0, absmax].  ``forward`` returns its input, so the
    observer can sit in a model or be called from a hook.
    """

    def __init__(self, num_bins: int = 2048, per_channel_axis: int | None = None):
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins={num_bins}; allowed: an integer >= 1")
        self.num_bins = num_bins
        self.per_channel_axis = per_channel_axis
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))
        self.register_buffer("channel_min", torch.empty(0))
        self.register_buffer("channel_max", torch.empty(0))
        self.register_buffer("hist", torch.zeros(num_bins, dtype=torch.int64))
        self.register_buffer("hist_range", torch.tensor(0.0, dtype=torch.float64))  # R; 0 = no data yet
        self.register_buffer("nonfinite", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("zeros", torch.tensor(0, dtype=torch.int64))  # exact zeros, all in bin 0

    @property
    def num_nonfinite(self) -> int:
        """How many NaN / +-inf values were seen (and ignored)."""
        return int(self.nonfinite)

    @property
    def signed(self) -> bool:
        """True if any recorded value was negative."""
        return bool(self.min_val < 0)

    @property
    def absmax(self) -> float:
        """Largest recorded |x| (0 before any finite value)."""
        if self.hist_range == 0:
            return 0.0
        return max(-float(self.min_val), float(self.max_val))

    def forward(self, x: Tensor) -> Tensor:
        self._record(x.detach())
        return x

    @torch.no_grad()
    def _record(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        x = x.float()
        finite = torch.isfinite(x)
        if self.per_channel_axis is not None:  # first: it rejects a batch with the wrong channel count
            self._record_channels(x, finite)
        num_bad = x.numel() - int(finite.sum())
        self.nonfinite += num_bad
        values = x[finite] if num_bad else x.reshape(-1)
        if values.numel() == 0:
            return
        lo, hi = torch.aminmax(values)
        self.min_val.fill_(min(float(self.min_val), float(lo)))
        self.max_val.fill_(max(float(self.max_val), float(hi)))
        self.zeros += int((values == 0).sum())
        self._record_hist(values.abs(), max(-float(lo), float(hi)))

    def _record_channels(self, x: Tensor, finite: Tensor) -> None:
        if x.dim() == 0:
            raise ValueError(f"per_channel_axis={self.per_channel_axis} needs a tensor with dimensions, got a scalar")
        axis = self.per_channel_axis % x.dim()
        channels = x.shape[axis]
        if self.channel_min.numel() not in (0, channels):
            raise ValueError(
                f"per-channel observer saw {self.channel_min.numel()} channels on axis {axis} before, now {channels}"
            )
        xc = x.movedim(axis, 0).reshape(channels, -1)
        fc = finite.movedim(axis, 0).reshape(channels, -1)
        cmin = torch.where(fc, xc, math.inf).amin(1).to(self.min_val.device)
        cmax = torch.where(fc, xc, -math.inf).amax(1).to(self.min_val.device)
        if self.channel_min.numel() == 0:
            self.channel_min, self.channel_max = cmin, cmax
        else:
            torch.minimum(self.channel_min, cmin, out=self.channel_min)
            torch.maximum(self.channel_max, cmax, out=self.channel_max)

    def _record_hist(self, a: Tensor, amax: float) -> None:
        n = self.num_bins
        r = float(self.hist_range)
        if r == 0:
            r = max(amax, MIN_RANGE)
        elif amax > r:
            k = pot_ceil(amax / r)
            while r * 2**k < amax:  # guard the rounding of amax / r
                k += 1
            group = min(2**k, n)  # every bin lands in bin 0 once groups span the histogram
            merged = torch.zeros_like(self.hist)
            self.hist = merged.index_add_(0, torch.arange(n, device=self.hist.device) // group, self.hist)
            r *= 2**k
        # Right-closed bins (e_j, e_j+1] (bin 0 is [0, e_1]) on edges e_j = j * r / n, rounded
        # once to float32: the edges of a grid grown by 2^k are every 2^k-th edge of the old
        # one bit for bit, so merged bins hold exactly what the new grid would have counted.
        edges = (torch.arange(1, n, dtype=torch.float64, device=a.device) * (r / n)).float()
        self.hist += torch.bincount(torch.bucketize(a, edges), minlength=n).to(self.hist.device)
        self.hist_range.fill_(r)

    def histogram(self) -> tuple[Tensor, float]:
        """(counts, edges_max): the recorded bins of |x| up to the one holding the absmax."""
        if self.hist_range == 0:
            raise RuntimeError(
                f"RangeObserver has recorded no finite values ({self.num_nonfinite} non-finite); nothing to calibrate"
            )
        used = int(self.hist.nonzero().max()) + 1
        return self.hist[:used].clone(), used * float(self.hist_range) / self.num_bins

    def compute_range(self, method: str = "max", *, bits: int = 8, percentile: float = 99.99) -> float:
        """Clipping range r > 0 of the recorded stream by ``method`` (see :func:`compute_range`).

        ``"max"`` is the exact absmax; the other methods work on the histogram, use the
        recorded signedness for the grid, and are capped at the absmax.  ``"mse"`` and
        ``"entropy"`` leave out the exact zeros: they are quantized exactly at any range, and
        the zero spike of a ReLU output would otherwise dominate the divergence of the first
        level and pull the entropy threshold far down.  An all-zero stream gives MIN_RANGE.
        Raises RuntimeError when no finite value was recorded.
        """
        _check_method(method)
        hist, edges_max = self.histogram()
        amax = self.absmax
        if method == "max" or amax == 0:
            return max(amax, MIN_RANGE)
        if method in ("mse", "entropy"):
            hist[0] -= self.zeros
        r = compute_range(hist, edges_max, method, bits=bits, signed=self.signed, percentile=percentile)
        return max(min(r, amax), MIN_RANGE)

    def channel_absmax(self) -> Tensor:
        """Per-channel max |x| along ``per_channel_axis`` (0 for a channel without finite values)."""
        if self.per_channel_axis is None:
            raise RuntimeError("per-channel statistics are not recorded: RangeObserver(per_channel_axis=None)")
        seen = self.channel_max >= self.channel_min
        absmax = torch.maximum(-self.channel_min, self.channel_max)
        return torch.where(seen, absmax, torch.zeros_like(absmax))
