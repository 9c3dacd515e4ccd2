"""Range calibration on distributions with known answers, and the observer's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from hmqsearch.quant.calibration import MIN_RANGE, RangeObserver, compute_range, pot_ceil
from hmqsearch.quant.functional import fake_quant_pot


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return torch.randn(1 << 22, generator=_gen(0))


@pytest.fixture(scope="module")
def gauss_obs(gauss: torch.Tensor) -> RangeObserver:
    obs = RangeObserver()
    obs(gauss)
    return obs


def _bin_width(obs: RangeObserver) -> float:
    hist, edges_max = obs.histogram()
    return edges_max / hist.numel()


def test_uniform_max_and_percentile():
    obs = RangeObserver()
    obs(torch.rand(1 << 20, generator=_gen(1)) * 2 - 1)
    assert obs.compute_range("max") == pytest.approx(1.0, abs=1e-4)
    assert obs.compute_range("percentile", percentile=99.9) == pytest.approx(0.999, abs=1e-3)
    assert obs.signed


def test_gaussian_percentiles(gauss: torch.Tensor, gauss_obs: RangeObserver):
    # |x| of N(0, 1): the p-th percentile is ndtri(1/2 + p/200); 99.99 -> 3.8906
    analytic = float(torch.special.ndtri(torch.tensor(0.5 + 99.99 / 200, dtype=torch.float64)))
    assert analytic == pytest.approx(3.8906, abs=1e-4)
    assert gauss_obs.compute_range("percentile", percentile=99.99) == pytest.approx(analytic, abs=0.04)
    # against the exact sample quantile: within one bin of the histogram
    a = gauss.abs()
    for p in (99.9, 99.99, 99.999):
        exact = float(a.kthvalue(math.ceil(a.numel() * p / 100)).values)
        assert abs(gauss_obs.compute_range("percentile", percentile=p) - exact) <= _bin_width(gauss_obs)


def _brute_force_mse(x: torch.Tensor, grid: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Quantization MSE of ``x`` for each range in ``grid``, with functional.py's quantizer."""
    levels = 2 ** (bits - 1 if signed else bits)
    return torch.stack([((fake_quant_pot(x, r / levels, bits, signed) - x) ** 2).mean() for r in grid])


@pytest.mark.parametrize(
    ("bits", "lo", "hi", "literature"),
    # ACIQ (Banner et al.) clips a Gaussian symmetrically at 2.55 sigma (4 bits), 3.92 (8 bits)
    [(4, 2.4, 3.0, 2.55), (8, 3.6, 4.3, 3.92)],
)
def test_mse_gaussian_matches_brute_force(gauss: torch.Tensor, gauss_obs: RangeObserver, bits, lo, hi, literature):
    x = gauss[: 1 << 20]
    grid = torch.arange(lo, hi, 0.005)
    mse = _brute_force_mse(x, grid, bits, signed=True)
    r = gauss_obs.compute_range("mse", bits=bits)
    mse_r = _brute_force_mse(x, torch.tensor([r]), bits, signed=True)[0]
    assert mse_r <= mse.min() * 1.002
    assert r == pytest.approx(float(grid[mse.argmin()]), abs=0.05)
    # this grid clips at -r and r - d (d = r / 2^(b-1)); its centre r - d/2 is ACIQ's clip
    assert r - r / 2**bits == pytest.approx(literature, abs=0.06)


def test_mse_wider_at_8_bits(gauss_obs: RangeObserver):
    r4, r8 = gauss_obs.compute_range("mse", bits=4), gauss_obs.compute_range("mse", bits=8)
    assert 2.6 < r4 < 2.8 and 3.85 < r8 < 4.1


def test_mse_unsigned_matches_brute_force(gauss: torch.Tensor):
    x = gauss[: 1 << 20].relu()
    obs = RangeObserver()
    obs(x)
    assert not obs.signed
    r = obs.compute_range("mse", bits=4)
    grid = torch.arange(2.5, 3.8, 0.01)
    mse = _brute_force_mse(x, grid, 4, signed=False)
    assert _brute_force_mse(x, torch.tensor([r]), 4, signed=False)[0] <= mse.min() * 1.002
    assert r == pytest.approx(float(grid[mse.argmin()]), abs=0.05)


@pytest.mark.parametrize("dist", ["gauss", "laplace"])
def test_entropy_between_p99_and_max(dist: str):
    g = _gen(2)
    x = torch.randn(1 << 20, generator=g)
    if dist == "laplace":  # inverse CDF of Laplace(0, 1)
        u = torch.rand(1 << 20, generator=g, dtype=torch.float64) - 0.5
        x = (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    obs = RangeObserver()
    obs(x)
    r = obs.compute_range("entropy")
    p99 = float(x.abs().kthvalue(int(x.numel() * 0.99)).values)
    assert p99 < r < obs.compute_range("max")
    # fewer levels: coarser quantization pays more for range, so the threshold drops
    assert obs.compute_range("entropy", bits=4) < r


def _kl_reference(counts: torch.Tensor, levels: int) -> int:
    """TensorRT's KL calibration written out candidate by candidate; returns the best i."""
    counts = counts.double()
    best_i, best_kl = 0, math.inf
    for i in range(levels, counts.numel() + 1):
        p = counts[:i].clone()
        p[-1] += counts[i:].sum()
        level_of = torch.arange(i) * levels // i
        q = torch.zeros(i, dtype=torch.float64)
        for k in range(levels):
            sel = (level_of == k) & (counts[:i] > 0)
            if sel.any():
                q[sel] = counts[:i][sel].sum() / sel.sum()
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        kl = math.inf if (q[m] == 0).any() else float((p[m] * torch.log(p[m] / q[m])).sum())
        if kl <= best_kl:  # ties: the widest threshold
            best_i, best_kl = i, kl
    return best_i


@pytest.mark.parametrize("signed", [True, False])
def test_entropy_matches_reference_loop(signed: bool):
    g = _gen(3)
    counts = torch.poisson(2000 * torch.exp(-torch.arange(160.0) / 25), generator=g)
    counts[torch.randint(0, 160, (20,), generator=g)] = 0  # empty bins: Q spreads over non-zero ones only
    bits = 4 if signed else 3  # 8 levels either way
    r = compute_range(counts, 160.0, "entropy", bits=bits, signed=signed)
    assert r == _kl_reference(counts, 8)


def test_rebinning_matches_one_shot():
    x = torch.randn(1 << 20, generator=_gen(4))
    once = RangeObserver()
    once(x)
    batches = x[x.abs().argsort()].chunk(64)  # ascending |x|: the max grows on every batch
    streamed, merged_once = RangeObserver(), RangeObserver()
    for batch in batches:
        streamed(batch)
    merged_once(batches[0])
    merged_once(torch.cat(batches[1:]))
    # 63 successive merges count exactly what one merge to the same final grid counts
    assert torch.equal(streamed.hist, merged_once.hist)
    hist, _ = streamed.histogram()
    assert int(hist.sum()) == x.numel() and hist.numel() >= streamed.num_bins // 2
    width = _bin_width(streamed)
    for p in (99.0, 99.9, 99.99):
        a, b = streamed.compute_range("percentile", percentile=p), once.compute_range("percentile", percentile=p)
        assert abs(a - b) <= width
    assert streamed.compute_range("max") == once.compute_range("max")
    assert streamed.compute_range("mse", bits=4) == pytest.approx(once.compute_range("mse", bits=4), abs=2 * width)


def test_zeros_first_then_data_and_odd_bin_count():
    obs = RangeObserver(num_bins=1000)
    obs(torch.zeros(100))
    obs(torch.rand(10000, generator=_gen(5)) * 3)
    hist, edges_max = obs.histogram()
    assert int(hist.sum()) == 10100 and int(hist[0]) >= 100
    assert hist.numel() >= 500  # re-binning by powers of two keeps at least half the bins in use
    assert obs.absmax <= edges_max < obs.absmax + edges_max / hist.numel()
    # median of 100 zeros and 10000 values uniform on [0, 3]: the 4950th value, 1.485
    assert obs.compute_range("percentile", percentile=50) == pytest.approx(1.485, abs=0.03)


def test_relu_zeros_do_not_pull_entropy_down():
    x = torch.randn(1 << 20, generator=_gen(6))
    relu, positive = RangeObserver(), RangeObserver()
    relu(x.relu())
    positive(x[x > 0])
    for method in ("mse", "entropy"):
        assert relu.compute_range(method) == positive.compute_range(method)
    assert relu.compute_range("entropy") > float(x.relu().kthvalue(int(x.numel() * 0.99)).values)


def test_per_channel_absmax_and_signedness():
    obs = RangeObserver(per_channel_axis=1)
    batches = [torch.randn(8, 4, 5, generator=_gen(s)) * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None] for s in (7, 8)]
    batches[1][0, 2, 0] = math.nan
    for b in batches:
        assert obs(b) is b
    expected = torch.cat(batches).nan_to_num(0.0).abs().amax(dim=(0, 2))
    assert torch.equal(obs.channel_absmax(), expected)
    assert obs.signed and obs.num_nonfinite == 1
    with pytest.raises(ValueError, match="channels"):
        obs(torch.randn(8, 3, 5))
    relu = RangeObserver()
    relu(torch.randn(100, generator=_gen(9)).relu())
    assert not relu.signed
    relu(torch.tensor([-1e-6]))
    assert relu.signed
    with pytest.raises(RuntimeError, match="per_channel_axis"):
        relu.channel_absmax()


def test_works_as_forward_hook():
    layer = torch.nn.Linear(3, 2)
    obs = RangeObserver()
    layer.register_forward_hook(lambda _m, _i, out: obs(out))
    out = layer(torch.randn(5, 3, generator=_gen(10)))
    assert obs.compute_range("max") == pytest.approx(float(out.detach().abs().max()))


def test_all_zero_input():
    obs = RangeObserver()
    obs(torch.zeros(4, 4))
    for method in ("max", "percentile", "mse", "entropy"):
        assert obs.compute_range(method) == MIN_RANGE
    assert pot_ceil(MIN_RANGE) == -26
    assert compute_range(torch.zeros(16), 1.0, "mse", bits=8, signed=True) == MIN_RANGE


def test_nonfinite_and_empty_batches():
    obs = RangeObserver()
    obs(torch.empty(0, 3))
    with pytest.raises(RuntimeError, match="no finite values"):
        obs.compute_range()
    obs(torch.tensor([math.nan, math.inf, -math.inf]))
    with pytest.raises(RuntimeError, match="3 non-finite"):
        obs.compute_range()
    obs(torch.tensor([0.5, -2.0, math.nan, 1.0]))
    obs(torch.empty(0))
    assert obs.num_nonfinite == 4
    assert obs.compute_range("max") == 2.0
    assert int(obs.histogram()[0].sum()) == 3
    assert all(math.isfinite(obs.compute_range(m)) for m in ("percentile", "mse", "entropy"))


def test_bad_method_and_arguments():
    obs = RangeObserver()
    obs(torch.randn(100, generator=_gen(11)))
    for call in (lambda: obs.compute_range("kl"), lambda: compute_range(torch.ones(8), 1.0, "kl", bits=8, signed=True)):
        with pytest.raises(ValueError, match="'kl'.*'max', 'percentile', 'mse', 'entropy'"):
            call()
    with pytest.raises(ValueError, match="percentile"):
        obs.compute_range("percentile", percentile=0)
    with pytest.raises(ValueError, match="bits"):
        obs.compute_range("mse", bits=0)


def test_histogram_range_by_hand():
    hist = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert compute_range(hist, 6.0, "max", bits=8, signed=True) == 4.0
    assert compute_range(hist, 6.0, "percentile", bits=8, signed=True, percentile=50) == 2.0
    assert compute_range(hist, 6.0, "percentile", bits=8, signed=True, percentile=100) == 4.0
    # 8 bits cannot clip with 6 bins: the whole histogram
    assert compute_range(hist, 6.0, "entropy", bits=8, signed=True) == 6.0


def test_pot_ceil():
    cases = {1.0: 0, 0.75: 0, 1.5: 1, 2.0: 1, 2.0001: 2, 3.89: 2, 0.5: -1, 0.3: -1, 2.0**-26: -26}
    assert {r: pot_ceil(r) for r in cases} == cases
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            pot_ceil(bad)
