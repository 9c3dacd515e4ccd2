"""Quantizer integer ranges and rounding against hand-computed values (DESIGN.md semantics)."""

import torch

from hmqsearch.quant.functional import fake_quant_pot, int_range, quantize_to_int, step_size


def test_integer_ranges():
    assert int_range(8, True) == (-128, 127)
    assert int_range(8, False) == (0, 255)
    assert int_range(4, True) == (-8, 7)
    assert int_range(4, False) == (0, 15)
    assert int_range(2, True) == (-2, 1)


def test_steps_for_threshold_one():
    assert step_size(1.0, 8, True) == 1 / 128
    assert step_size(1.0, 8, False) == 1 / 256
    assert step_size(4.0, 4, True) == 0.5
    assert step_size(4.0, 4, False) == 0.25


def test_signed_4bit_hand_table():
    # t = 4, b = 4 signed: d = 0.5, q in [-8, 7]
    x = torch.tensor([-10.0, -4.0, -4.1, -0.25, 0.25, 0.75, 1.25, 3.4, 3.5, 3.75, 100.0])
    q = quantize_to_int(x, torch.tensor(0.5), 4, True)
    # -0.25/0.5 = -0.5 -> -0 (half to even); 0.75/0.5 = 1.5 -> 2; 1.25/0.5 = 2.5 -> 2
    assert q.tolist() == [-8, -8, -8, 0, 0, 2, 2, 7, 7, 7, 7]
    out = fake_quant_pot(x, torch.tensor(0.5), 4, True)
    assert out.tolist() == [-4.0, -4.0, -4.0, 0.0, 0.0, 1.0, 1.0, 3.5, 3.5, 3.5, 3.5]


def test_unsigned_2bit_hand_table():
    # t = 1, b = 2 unsigned: d = 0.25, q in [0, 3]
    x = torch.tensor([-1.0, 0.1, 0.125, 0.375, 0.5, 0.74, 2.0])
    q = quantize_to_int(x, torch.tensor(0.25), 2, False)
    assert q.tolist() == [0, 0, 0, 2, 2, 3, 3]


def test_ste_gradient_inside_clip_only():
    x = torch.tensor([-5.0, -1.0, 0.3, 3.4, 3.6, 9.0], requires_grad=True)
    fake_quant_pot(x, torch.tensor(0.5), 4, True).sum().backward()
    # range is [-4, 3.5]: gradient 1 inside, 0 outside
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_fake_quant_equals_integer_codes_times_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, generator=g) * 3
    for bits in (2, 3, 4, 8):
        for signed in (True, False):
            step = torch.tensor(2.0**-3)
            ref = quantize_to_int(x, step, bits, signed).float() * step
            assert torch.equal(fake_quant_pot(x, step, bits, signed), ref)
