"""The HMQ block: grid, initialisation, expected bits and their gradient, forwards."""

import math

import pytest
import torch

from hmqsearch.quant.functional import fake_quant_pot
from hmqsearch.quant.hmq import HMQQuantizer


def make(bits=(2, 4, 8), n_t=4, **kw):
    q = HMQQuantizer(list(bits), n_t, **kw)
    q.set_range(torch.tensor(3.0))  # M = 2: thresholds 8, 4, 2, 1
    return q


def test_threshold_grid_from_range():
    q = make()
    assert q.threshold_table().tolist() == [[8.0, 4.0, 2.0, 1.0]]
    q.set_range(torch.tensor(4.0))  # exactly a power of two: M = 2
    assert q.threshold_table()[0, 0].item() == 8.0


def test_initial_mass_on_highest_bits_widest_threshold():
    q = make()
    p = q.probs().reshape(3, 4)
    assert p[2, 0].item() == pytest.approx(0.95, abs=1e-6)
    assert q.argmax().bits == 8 and q.argmax().threshold_exp == (3,)


def test_expected_bits_and_gradient_to_logits():
    q = make()
    with torch.no_grad():
        q.logits.zero_()
    assert q.expected_bits().item() == pytest.approx((2 + 4 + 8) / 3)
    q.expected_bits().backward()
    # d E[b] / d alpha_k = p_k (b_k - E[b]); uniform p = 1/12
    eb = 14 / 3
    want = torch.tensor([[(b - eb) / 12] * 4 for b in (2, 4, 8)])
    assert torch.allclose(q.logits.grad, want, atol=1e-6)


def test_eval_uses_argmax_scheme_exactly():
    q = make(signed=False)
    q.fix(q.scheme_at(4, 1))  # t = 4, unsigned 4 bit: d = 0.25
    q.state = "search"
    q.eval()
    x = torch.linspace(-1, 6, 101)
    assert torch.equal(q(x), fake_quant_pot(x, torch.tensor(0.25), 4, False))


def test_expected_forward_matches_single_candidate_at_low_temperature():
    q = make()
    with torch.no_grad():  # all the mass on (8 bits, t_0)
        q.logits.fill_(0.0)
        q.logits[2, 0] = 20.0
    q.state = "search"
    q.train()
    q.tau.fill_(1e-3)
    x = torch.randn(1000)
    assert torch.allclose(q(x), fake_quant_pot(x, torch.tensor(8.0 / 128), 8, True), atol=1e-6)


@pytest.mark.parametrize("mode", ["expected", "mixture", "hard", "argmax"])
def test_search_forward_sends_gradient_to_logits(mode):
    torch.manual_seed(0)
    q = make(mode=mode)
    q.state = "search"
    q.train()
    x = torch.randn(256) * 2
    loss = (q(x) - x).pow(2).mean()
    loss.backward()
    assert q.logits.grad is not None and q.logits.grad.abs().sum() > 0


def test_argmax_mode_trains_at_the_argmax_whatever_the_noise():
    """mode=argmax: at a high temperature the Gumbel samples differ from step to step, yet the
    forward is always the argmax candidate's, and the logits still get the soft sample's gradient."""
    q = make(mode="argmax")
    with torch.no_grad():
        q.logits.fill_(0.0)
        q.logits[1, 2] = 0.5  # 4 bits, t = 2: the argmax by a small margin
    q.state = "search"
    q.train()
    q.tau.fill_(5.0)
    x = torch.randn(500) * 2
    expected = fake_quant_pot(x, torch.tensor(2.0 / 8), 4, True)
    torch.manual_seed(0)
    for _ in range(20):
        q.logits.grad = None
        out = q(x)
        assert torch.allclose(out, expected, atol=1e-6)
        (out - x).pow(2).mean().backward()
        assert q.logits.grad.abs().sum() > 0


def test_mixture_is_weighted_sum_of_candidates():
    q = make(bits=(4, 8), n_t=2, mode="mixture")
    q.state = "search"
    q.train()
    torch.manual_seed(1)
    x = torch.randn(100)
    torch.manual_seed(2)
    out = q(x)
    torch.manual_seed(2)
    pi = q.sample()
    step, lo, hi = q.candidate_tables()
    ref = sum(pi[k] * fake_quant_pot(x, step[k, 0], int(q.bits[k // 2]), True) for k in range(4))
    assert torch.allclose(out, ref, atol=1e-6)


def test_per_channel_thresholds_follow_channel_ranges():
    q = HMQQuantizer([8], 2, per_channel_axis=0, num_channels=3)
    w = torch.tensor([[0.5, -0.2], [3.0, 1.0], [-0.1, 0.05]])
    q.set_range(w.abs().amax(1))
    assert q.base_exp.tolist() == [-1.0, 2.0, -3.0]
    assert q.argmax().threshold_exp == (0, 3, -2)


def test_float_state_is_identity():
    q = make()
    x = torch.randn(10)
    assert q(x) is x


def test_bad_mode_and_bits():
    with pytest.raises(ValueError, match="mode='soft'"):
        HMQQuantizer([8], mode="soft")
    with pytest.raises(ValueError, match="at least one"):
        HMQQuantizer([])
    assert math.isfinite(make().expected_bits().item())


def test_data_prior_prefers_lowest_mse_threshold_per_bit_width():
    q = make(bits=(2, 8), n_t=4)  # thresholds 8, 4, 2, 1
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))  # |x| mostly < 3
    q.init_from_data(x)
    mse = q.candidate_mse(x)
    rows = q.logits.detach()
    assert rows.argmax(1).tolist() == mse.argmin(1).tolist()
    assert mse[0].argmin().item() > 0  # at 2 bits a narrower threshold than the widest wins
    p = q.probs().reshape(2, 4)
    assert p[1].max().item() == pytest.approx(0.95, abs=1e-5)  # initial mass on 8 bits
