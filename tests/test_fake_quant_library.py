"""The fake-quant op registered in C++ with its autograd in C++ (fake_quant_library.h), which
eager calls run when an extension serves the tensor: the same outputs and gradients as the
Python autograd.Function over the same kernels, asked-for gradients only, no graph without
grad. CPU: the compiled float32 kernel; GPU (``-m gpu``): the CUDA kernels in three dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from hmqsearch.kernels import backend
from hmqsearch.kernels.ops import _EagerFakeQuant, _eager_op, _library_op, fake_quant

SHAPE = (6, 5, 4, 3)


def extension(device_type: str):
    ext = backend.extension_for(device_type, torch.float32)
    if ext is None:
        pytest.skip(f"no {device_type} extension here: {backend.backend_report()}")
    return ext


def params(axis: int | None, channels: int, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = () if axis is None else (channels,)
    step = torch.rand(n, generator=gen) * 0.2 + 0.02
    return [step, step * -8.3, step * 7.2]


def grads_of(op, x: Tensor, ps: list[Tensor], axis: int | None, wanted: tuple[bool, ...], grad: Tensor):
    leaves = [t.detach().clone().requires_grad_(w) for t, w in zip([x, *ps], wanted)]
    out = op(*leaves, axis)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("axis", [None, 0, 1, 3])
@pytest.mark.parametrize("wanted", [(True, True, True, True), (True, False, False, False), (False, True, False, True)])
def test_cpu_library_op_equals_the_function(axis: int | None, wanted: tuple[bool, ...]) -> None:
    ext = extension("cpu")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=gen) * 2
    grad = torch.randn(SHAPE, generator=gen)
    ps = params(axis, SHAPE[axis] if axis is not None else 1)
    got_out, got = grads_of(_library_op(ext), x, ps, axis, wanted, grad)
    want_out, want = grads_of(_EagerFakeQuant.apply, x, ps, axis, wanted, grad)
    assert torch.equal(got_out, want_out)
    for g, w, asked in zip(got, want, wanted):
        assert (g is None) == (not asked) and (w is None) == (not asked)
        if asked:
            assert torch.equal(g, w)


def test_eager_calls_take_the_library_op_for_float32_only() -> None:
    ext = extension("cpu")
    assert _eager_op(torch.zeros(2)) is _library_op(ext)
    assert _eager_op(torch.zeros(2, dtype=torch.bfloat16)) == _EagerFakeQuant.apply  # the CPU kernel is float32


def test_library_op_on_a_non_contiguous_input_and_without_grad() -> None:
    ext = extension("cpu")
    x = torch.randn(8, 6).t()  # channel axis 1 of a transposed view
    ps = params(1, 8)
    with torch.no_grad():
        out = _library_op(ext)(x, *ps, 1)
    assert out.grad_fn is None and out.shape == x.shape
    assert torch.equal(out, _EagerFakeQuant.apply(x, *ps, 1))
    with torch.inference_mode():  # below autograd: the CPU kernel itself
        assert torch.equal(_library_op(ext)(x, *ps, 1), out)


def test_fake_quant_backward_through_the_library_op_matches_the_ste_rule() -> None:
    extension("cpu")
    x = torch.tensor([-3.0, -0.26, 0.0, 0.124, 0.5, 2.0], requires_grad=True)
    step, lo, hi = (torch.tensor(v, requires_grad=True) for v in (0.25, -1.0, 0.75))
    out = fake_quant(x, step, lo, hi)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "CppFunction"  # C++ autograd, no Python backward
    assert out.tolist() == [-1.0, -0.25, 0.0, 0.0, 0.5, 0.75]
    out.backward(torch.ones(6))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert lo.grad.item() == 1.0 and hi.grad.item() == 1.0
    u = torch.tensor([-1.0, -0.26, 0.0, 0.124, 0.5, 0.75]) / 0.25
    assert step.grad.item() == pytest.approx(float((torch.round(u) - u).sum()), abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [None, 1, 3])
def test_cuda_library_op_equals_the_function(dtype: torch.dtype, axis: int | None) -> None:
    ext = backend.extension_for("cuda", dtype)
    if ext is None:
        pytest.skip(backend.backend_report())
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(SHAPE, generator=gen) * 2).to("cuda", dtype)
    grad = torch.randn(SHAPE, generator=gen).to("cuda", dtype)
    ps = [p.cuda() for p in params(axis, SHAPE[axis] if axis is not None else 1)]
    assert _eager_op(x) is _library_op(ext)
    got_out, got = grads_of(_library_op(ext), x, ps, axis, (True,) * 4, grad)
    want_out, want = grads_of(_EagerFakeQuant.apply, x, ps, axis, (True,) * 4, grad)
    assert torch.equal(got_out, want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same kernels, the same launch order
