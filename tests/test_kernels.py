"""hmqsearch.kernels: the fake-quant custom ops against functional.fake_quant_ref.

Forward: bit for bit equal to the reference in float32 (float16/bfloat16: the reference on the
float32 upcast, rounded once).  Gradients: the straight-through rule of functional.py's
docstring, allclose to autograd through the reference wherever no input sits exactly on a
clipping bound.  The CPU numerics tests run on both CPU backends (the compiled kernel and the
PyTorch implementation); GPU tests compare the CUDA kernels with the PyTorch implementation.
"""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch
from torch import Tensor

from hmqsearch.kernels import active_backend, backend, backend_report, fake_quant, torch_impl
from hmqsearch.kernels.ops import fake_quant_backward_op, fake_quant_op
from hmqsearch.kernels.torch_impl import channel_view
from hmqsearch.quant.functional import fake_quant_ref

Axis = int | None
SHAPE = (6, 5, 4, 3)
LAYOUTS: list[Axis] = [None, 0, 1, -1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------- helpers
def make_params(shape, axis: Axis, signed: bool, pot: bool, seed: int = 0) -> tuple[Tensor, ...]:
    """step/lo/hi: powers of two with integer-range bounds, or 'expected' (arbitrary) values."""
    gen = torch.Generator().manual_seed(seed)
    n = () if axis is None else (shape[axis],)
    qmin, qmax = (-8, 7) if signed else (0, 15)
    if pot:
        step = torch.exp2(torch.randint(-5, 0, n, generator=gen).float())
        return step, step * qmin, step * qmax
    step = torch.rand(n, generator=gen) * 0.2 + 0.02
    stretch = 1 + 0.1 * torch.rand(n, generator=gen)
    return step, step * qmin * stretch, step * qmax * stretch


def reference(x: Tensor, params, axis: Axis, grad: Tensor) -> tuple[Tensor, list[Tensor]]:
    """fake_quant_ref on a float32 copy of x: output in x's dtype and autograd gradients."""
    xf = x.detach().float().requires_grad_()
    ps = [p.detach().clone().requires_grad_() for p in params]
    views = ps if axis is None else [channel_view(p, x.dim(), axis % x.dim()) for p in ps]
    out = fake_quant_ref(xf, *views)
    out.backward(grad.float())
    return out.detach().to(x.dtype), [xf.grad, *(p.grad for p in ps)]


def run(x: Tensor, params, axis: Axis, grad: Tensor) -> tuple[Tensor, list[Tensor]]:
    """fake_quant on leaf copies: output and gradients w.r.t. x, step, lo, hi."""
    xr = x.detach().clone().requires_grad_()
    ps = [p.detach().clone().requires_grad_() for p in params]
    out = fake_quant(xr, *ps, axis=axis)
    out.backward(grad)
    return out.detach(), [xr.grad, *(p.grad for p in ps)]


def assert_bitwise(a: Tensor, b: Tensor) -> None:
    """Same dtype, shape and bits (NaN matched by position, any payload)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    bits = {4: torch.int32, 2: torch.int16}[a.element_size()]
    a, b = a.contiguous().view(bits), b.contiguous().view(bits)
    assert torch.equal(a[~nan], b[~nan])


def assert_grads_close(got: list[Tensor], want: list[Tensor]) -> None:
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-4, atol=1e-4, equal_nan=True)


def ste_grads(x: Tensor, params, axis: Axis, grad: Tensor) -> list[Tensor]:
    """The documented straight-through gradients, computed independently in float64."""
    step, lo, hi = (
        p.double() if axis is None else channel_view(p.double(), x.dim(), axis) for p in params
    )
    xd, gd = x.double(), grad.double()
    u = torch.minimum(torch.maximum(xd, lo), hi) / step
    kept = None if axis is None else axis % x.dim()
    dims = [d for d in range(x.dim()) if d != kept]

    def total(t: Tensor, like: Tensor) -> Tensor:
        return t.sum(dims).reshape(like.shape).float() if dims else t.reshape(like.shape).float()

    grad_x = torch.where((xd >= lo) & (xd <= hi), gd, 0).to(x.dtype)
    return [
        grad_x,
        total(gd * (torch.round(u) - u), params[0]),
        total(torch.where(xd < lo, gd, 0), params[1]),
        total(torch.where(xd > hi, gd, 0), params[2]),
    ]


@pytest.fixture(params=["cpu-kernels", "pytorch"])
def cpu_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on the compiled CPU kernel, then on the PyTorch implementation."""
    if request.param == "pytorch":
        monkeypatch.setenv("HMQ_DISABLE_KERNELS", "1")
    else:
        monkeypatch.delenv("HMQ_DISABLE_KERNELS", raising=False)
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler to build the CPU kernel")
    assert active_backend("cpu") == request.param
    return request.param


# ------------------------------------------------------------------- CPU: numerics
@pytest.mark.parametrize("axis", LAYOUTS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("pot", [True, False], ids=["pot", "expected"])
def test_matches_reference(axis: Axis, signed: bool, pot: bool, cpu_backend: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=gen) * 2
    grad = torch.randn(SHAPE, generator=gen)
    params = make_params(SHAPE, axis, signed, pot)
    out, grads = run(x, params, axis, grad)
    want, want_grads = reference(x, params, axis, grad)
    assert_bitwise(out, want)
    assert_grads_close(grads, want_grads)
    assert_grads_close(grads, ste_grads(x, params, axis, grad))


def test_clipping_edges_follow_the_ste_rule(cpu_backend: str) -> None:
    step, lo, hi = torch.tensor(0.5), torch.tensor(-4.0), torch.tensor(3.5)
    inf = torch.tensor(math.inf)
    below, above = torch.nextafter(lo, -inf), torch.nextafter(hi, inf)
    inside_lo, inside_hi = torch.nextafter(lo, inf), torch.nextafter(hi, -inf)
    x = torch.stack([below, lo, inside_lo, inside_hi, hi, above])
    grad = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    out, (gx, gs, gl, gh) = run(x, (step, lo, hi), None, grad)
    assert_bitwise(out, reference(x, (step, lo, hi), None, grad)[0])
    assert out.tolist() == [-4.0, -4.0, -4.0, 3.5, 3.5, 3.5]
    # The whole g goes to x on the bounds themselves (autograd through the reference's
    # maximum/minimum would give half of it to x and half to the bound).
    assert gx.tolist() == [0.0, 2.0, 4.0, 8.0, 16.0, 0.0]
    assert gl.item() == 1.0 and gh.item() == 32.0
    torch.testing.assert_close(gs, ste_grads(x, (step, lo, hi), None, grad)[1])


def test_ties_round_half_to_even(cpu_backend: str) -> None:
    step = torch.tensor(0.25)
    k = torch.arange(-6, 6, dtype=torch.float32)
    x = (k + 0.5) * step  # exactly representable ties
    out = fake_quant(x, step, torch.tensor(-8.0), torch.tensor(8.0))
    assert torch.equal(out, torch.round(k + 0.5) * step)
    assert (out / step).remainder(2).eq(0).all()  # every tie went to the even neighbour
    assert_bitwise(out, fake_quant_ref(x, step, torch.tensor(-8.0), torch.tensor(8.0)))


def test_nan_and_inf(cpu_backend: str) -> None:
    """NaN stays NaN with zero grad_x and poisons grad_step of its channel only;
    +inf/-inf become hi/lo and send their gradient to hi/lo."""
    x = torch.tensor([[math.nan, math.inf, -math.inf, 0.3], [0.1, 0.2, 9.0, -9.0]])
    params = (torch.tensor([0.5, 0.25]), torch.tensor([-4.0, -2.0]), torch.tensor([3.5, 1.75]))
    grad = torch.tensor([[1.0, 2.0, 4.0, 8.0], [16.0, 32.0, 64.0, 128.0]])
    out, (gx, gs, gl, gh) = run(x, params, 0, grad)
    assert_bitwise(out, reference(x, params, 0, grad)[0])
    assert torch.isnan(out[0, 0]) and out[0, 1:].tolist() == [3.5, -4.0, 0.5]
    assert gx.tolist() == [[0.0, 0.0, 0.0, 8.0], [16.0, 32.0, 0.0, 0.0]]
    assert gl.tolist() == [4.0, 128.0] and gh.tolist() == [2.0, 64.0]
    assert torch.isnan(gs[0]) and torch.isfinite(gs[1])
    # Unbounded: u = inf / step is infinite and the reference's u + (round(u) - u) is NaN.
    unbounded = (torch.tensor(0.5), torch.tensor(-math.inf), torch.tensor(math.inf))
    x = torch.tensor([math.inf, -math.inf, 1.25])
    out = fake_quant(x, *unbounded)
    assert_bitwise(out, fake_quant_ref(x, *unbounded))
    assert torch.isnan(out[:2]).all() and out[2].item() == 1.0


@pytest.mark.parametrize(
    ("shape", "axis"), [((0,), None), ((0, 3), 1), ((4, 0), 0), ((2, 0, 3), -1)]
)
def test_empty(shape: tuple[int, ...], axis: Axis, cpu_backend: str) -> None:
    x = torch.empty(shape)
    params = make_params(shape, axis, True, True)
    out, (gx, gs, gl, gh) = run(x, params, axis, torch.empty(shape))
    assert out.shape == shape and gx.shape == shape
    for g, p in zip((gs, gl, gh), params):
        assert g.shape == p.shape and not g.any()


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda t: t.transpose(0, 3), id="transposed"),
        pytest.param(lambda t: t[:, ::2], id="strided"),
        pytest.param(lambda t: t.contiguous(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(lambda t: t.flatten()[1:575].reshape(-1, 7)[:, 2:], id="offset"),
    ],
)
@pytest.mark.parametrize("axis", LAYOUTS)
def test_non_contiguous(view, axis: Axis, cpu_backend: str) -> None:
    gen = torch.Generator().manual_seed(2)
    base = (torch.randn(6, 8, 4, 3, generator=gen) * 2).requires_grad_()
    x = view(base)
    params = make_params(x.shape, axis, True, False)
    grad = view(torch.randn(base.shape, generator=gen))
    ps = [p.clone().requires_grad_() for p in params]
    out = fake_quant(x, *ps, axis=axis)
    out.backward(grad)
    want, want_grads = reference(x, params, axis, grad)
    assert_bitwise(out, want)
    assert out.stride() == torch.empty_like(x).stride()
    assert_grads_close([view(base.grad), *(p.grad for p in ps)], want_grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", LAYOUTS)
def test_half_precision(dtype: torch.dtype, axis: Axis) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(SHAPE, generator=gen) * 2).to(dtype)
    grad = torch.randn(SHAPE, generator=gen).to(dtype)
    for pot in (True, False):
        params = make_params(SHAPE, axis, True, pot)
        out, grads = run(x, params, axis, grad)
        assert out.dtype == dtype and grads[0].dtype == dtype
        assert all(g.dtype == torch.float32 for g in grads[1:])
        assert_bitwise(out, reference(x, params, axis, grad)[0])
        # coarse half-precision inputs land exactly on the bounds: compare with the STE rule
        assert_grads_close(grads, ste_grads(x, params, axis, grad))
    # Power-of-two steps are exact in half precision: the reference run natively agrees.
    step, lo, hi = make_params(SHAPE, None, True, True)
    assert_bitwise(fake_quant(x, step, lo, hi), fake_quant_ref(x, step, lo, hi))


# --------------------------------------------------------------- CPU: the interface
def test_parameter_forms_and_gradient_shapes() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    step = torch.full((4,), 0.25, requires_grad=True)
    lo = torch.tensor(-2.0, requires_grad=True)  # scalar bound with per-channel step
    hi = torch.tensor([1.75], requires_grad=True)
    fake_quant(x, step, lo, hi, axis=-1).sum().backward()
    assert (step.grad.shape, lo.grad.shape, hi.grad.shape) == ((4,), (), (1,))
    out = fake_quant(x, 0.25, -2.0, 1.75)  # plain floats: per tensor
    assert_bitwise(out, fake_quant(x, torch.tensor(0.25), torch.tensor(-2.0), torch.tensor(1.75)))
    step64 = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    fake_quant(x, step64, lo, hi).sum().backward()
    assert step64.grad.dtype == torch.float64


def test_rejects_bad_arguments() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="shape"):
        fake_quant(x, torch.ones(3), -1.0, 1.0, axis=1)
    with pytest.raises(ValueError, match="one element"):
        fake_quant(x, torch.ones(4), -1.0, 1.0)
    with pytest.raises(ValueError, match="axis"):
        fake_quant(x, 1.0, -1.0, 1.0, axis=2)
    with pytest.raises(TypeError, match="float32"):
        fake_quant(x.double(), 1.0, -1.0, 1.0)


def test_gradients_only_where_required() -> None:
    x = torch.randn(5, 6, requires_grad=True)
    step, lo, hi = make_params((5, 6), 0, True, False)
    fake_quant(x, step, lo, hi, axis=0).sum().backward()  # parameter sums skipped
    assert_grads_close([x.grad], [ste_grads(x.detach(), (step, lo, hi), 0, torch.ones(5, 6))[0]])
    step = step.clone().requires_grad_()
    fake_quant(x.detach(), step, lo, hi, axis=0).sum().backward()  # only parameter grads
    want = ste_grads(x.detach(), (step.detach(), lo, hi), 0, torch.ones(5, 6))[1]
    torch.testing.assert_close(step.grad, want)


def test_opcheck() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 5, generator=gen) * 2
    for axis in (None, 1):
        params = [p.requires_grad_() for p in make_params(x.shape, axis, True, False)]
        torch.library.opcheck(fake_quant_op, (x.clone().requires_grad_(), *params, axis))
        plain = [p.detach() for p in params]
        for param_grads in (True, False):
            args = (torch.randn(x.shape, generator=gen), x, *plain, axis, param_grads)
            torch.library.opcheck(fake_quant_backward_op, args)


@pytest.mark.parametrize("axis", [None, 1])
def test_eager_function_equals_the_custom_op(axis: Axis, cpu_backend: str) -> None:
    """Eager fake_quant (a plain autograd.Function, for its lower call overhead) and the custom
    op with its registered autograd give the same bits, forward and backward."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(8, 4, 6, generator=gen) * 2
    params = make_params(x.shape, axis, True, False)
    grad = torch.randn(x.shape, generator=gen)
    out, grads = run(x, params, axis, grad)
    xr = x.clone().requires_grad_()
    ps = [p.clone().requires_grad_() for p in params]
    op_out = fake_quant_op(xr, *ps, axis)
    op_out.backward(grad)
    assert_bitwise(out, op_out.detach())
    for got, want in zip(grads, [xr.grad, *(p.grad for p in ps)]):
        assert_bitwise(got, want)


def test_torch_compile_traces_the_custom_op() -> None:
    torch._dynamo.reset()
    graphs = []

    def capture(gm: torch.fx.GraphModule, _inputs: list[Tensor]):  # noqa: ANN202
        graphs.append(gm)
        return gm.forward

    torch.compile(lambda x: fake_quant(x, 0.5, -4.0, 3.5), backend=capture, fullgraph=True)(torch.randn(5))
    assert any("hmqsearch.fake_quant" in str(node.target) for node in graphs[0].graph.nodes)


def _compiled_matches_eager(compile_backend: str) -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 6, generator=gen) * 2
    params = make_params(x.shape, 1, True, False)
    grad = torch.randn(x.shape, generator=gen)

    def fn(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        return fake_quant(x * 1.5, step, lo, hi, axis=1) * 2

    def go(f):
        xr = x.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in params]
        out = f(xr, *ps)
        out.backward(grad)
        return out.detach(), [xr.grad, *(p.grad for p in ps)]

    out, grads = go(torch.compile(fn, backend=compile_backend, fullgraph=True))
    want, want_grads = go(fn)
    assert_bitwise(out, want)
    assert_grads_close(grads, want_grads)


def test_torch_compile_aot_eager() -> None:
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor() -> None:
    _compiled_matches_eager("inductor")


CPU_EXT = "extension 'hmqsearch_fake_quant_cpu' built from fake_quant_cpu.cpp"
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")


@needs_compiler
def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HMQ_DISABLE_KERNELS", raising=False)
    assert active_backend("cpu") == "cpu-kernels"
    assert active_backend("cpu", torch.float16) == "pytorch"
    assert f"cpu: cpu-kernels ({CPU_EXT})" in backend_report()
    monkeypatch.setenv("HMQ_DISABLE_KERNELS", "1")
    assert active_backend("cpu") == "pytorch"
    assert active_backend("cuda") == "pytorch"
    assert "cpu: pytorch (HMQ_DISABLE_KERNELS is set)" in backend_report()
    if not torch.cuda.is_available():
        monkeypatch.delenv("HMQ_DISABLE_KERNELS")
        assert active_backend() == "cpu-kernels"
        assert "cuda: pytorch (torch.cuda.is_available() is False)" in backend_report()


@needs_compiler
def test_backend_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("HMQ_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(backend, "_announced", set())
    with caplog.at_level(logging.INFO, logger="hmqsearch.kernels"):
        for _ in range(3):
            fake_quant(torch.randn(4), 0.5, -4.0, 3.5)
            fake_quant(torch.randn(4, dtype=torch.bfloat16), 0.5, -4.0, 3.5)
    assert [r.getMessage() for r in caplog.records if "fake_quant on cpu" in r.getMessage()] == [
        f"fake_quant on cpu: cpu-kernels ({CPU_EXT})",
        "fake_quant on cpu: pytorch (the CPU kernel takes float32, torch.bfloat16 uses PyTorch)",
    ]


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_build_failure_falls_back(
    device_type: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    from torch.utils import cpp_extension

    def failing_build(**kwargs: object) -> None:
        raise RuntimeError("Ninja is required to load C++ extensions\n(details)")

    fresh = backend._Build(backend._BUILDS[device_type].label, "never_built", backend._BUILDS[device_type].sources)
    monkeypatch.setitem(backend._BUILDS, device_type, fresh)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "load", failing_build)
    monkeypatch.delenv("HMQ_DISABLE_KERNELS", raising=False)
    with caplog.at_level(logging.WARNING, logger="hmqsearch.kernels"):
        assert backend.extension_for(device_type) is None
        assert active_backend(device_type) == "pytorch"
    report = backend_report()
    failure = f"building the {device_type.upper()} extension failed"
    assert f"{device_type}: pytorch ({failure}: RuntimeError: Ninja" in report
    assert sum(failure in r.getMessage() for r in caplog.records) == 1


# ----------------------------------------------------------- GPU: kernels vs PyTorch
GPU_CASES = [
    # (shape, axis, view): cover both kernel layouts, 16-byte vectors and the scalar path
    ((1,), None, None),
    ((1000,), None, None),
    ((3, 1 << 20), None, None),  # rows layout, many chunks per row
    ((1023, 257), None, None),  # odd length: scalar loads
    ((64, 3, 3, 3), 0, None),  # inner 27: columns layout with a single row
    ((256, 1024), 0, None),  # rows layout, vector loads
    ((7, 1001), 0, None),  # rows layout, scalar loads
    ((8, 16, 14, 14), 1, None),  # columns layout, channels in segments of 196
    ((4, 8, 32, 32), 1, None),  # rows layout, per-channel rows
    ((8, 16, 14, 14), 1, "channels_last"),  # dense permuted: inner = stride(1) = 1
    ((4096, 3), -1, None),  # columns layout, narrow
    ((70000, 64), -1, None),
    ((5_000_000, 2), -1, None),  # more than 65535 * 64 rows: long strips per block
    ((6, 8, 40), 2, "strided"),  # non-dense: copied to contiguous
    (((1 << 16) + 1,), None, "offset"),  # misaligned data pointer: scalar loads
]


def _gpu_input(shape, view: str | None, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    x = torch.randn(shape, generator=gen) * 2
    flat = x.view(-1)
    k = min(flat.numel(), 8)
    flat[:k] = torch.tensor([math.nan, math.inf, -math.inf, -4.0, 3.5, 0.375, -0.125, 1e-40])[:k]
    x = x.cuda().to(dtype)
    if view == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if view == "strided":
        return x[:, ::2]
    if view == "offset":
        return torch.cat([x.new_zeros(1), x])[1:]
    return x


@pytest.mark.gpu
@needs_cuda
def test_gpu_backend_is_kernels() -> None:
    assert active_backend("cuda") == "cuda-kernels", backend_report()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "axis", "view"), GPU_CASES)
def test_gpu_kernels_match_pytorch(shape, axis: Axis, view: str | None, dtype: torch.dtype) -> None:
    ext = backend.extension_for("cuda")
    assert ext is not None, backend_report()
    gen = torch.Generator().manual_seed(6)
    x = _gpu_input(shape, view, dtype, gen)
    grad = torch.randn(x.shape, generator=gen).cuda().to(dtype)
    norm = None if axis is None else axis % x.dim()
    step, lo, hi = (p.cuda() for p in make_params(x.shape, norm, True, False))
    for p, v in ((step, 0.5), (lo, -4.0), (hi, 3.5)):  # the edge values above hit the bounds
        p.view(-1)[0] = v
    cpu = [t.cpu() for t in (x, step, lo, hi)]

    out = ext.forward(x, step, lo, hi, norm)
    assert out.stride() == torch.empty_like(x).stride()
    assert_bitwise(out.cpu(), torch_impl.forward(*cpu, norm))
    grads = ext.backward(grad, x, step, lo, hi, norm, True)
    want = torch_impl.backward(grad.cpu(), *cpu, norm, True)
    assert_bitwise(grads[0].cpu(), want[0])
    # float32 sums of up to 10^7 terms: compare relative to the sum of magnitudes
    scale = grad.float().abs().sum().item()
    for got, w in zip(grads[1:], want[1:]):
        torch.testing.assert_close(got.cpu(), w, rtol=0, atol=1e-5 * scale, equal_nan=True)
    grad_x_only = ext.backward(grad, x, step, lo, hi, norm, False)
    assert_bitwise(grad_x_only[0], grads[0])


@pytest.mark.gpu
@needs_cuda
def test_gpu_autograd_and_disable(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(32, 16, 9, generator=gen) * 2).cuda()
    grad = torch.randn(x.shape, generator=gen).cuda()
    params = [p.cuda() for p in make_params(x.shape, 1, False, False)]
    out, grads = run(x, params, 1, grad)
    monkeypatch.setenv("HMQ_DISABLE_KERNELS", "1")
    assert active_backend("cuda") == "pytorch"
    out_pt, grads_pt = run(x, params, 1, grad)
    assert_bitwise(out, out_pt)
    assert_grads_close(grads, grads_pt)


@pytest.mark.gpu
@needs_cuda
def test_gpu_torch_compile() -> None:
    torch._dynamo.reset()
    x = torch.randn(64, 32, device="cuda", requires_grad=True)
    step = torch.full((32,), 0.125, device="cuda", requires_grad=True)
    fn = torch.compile(lambda x, s: fake_quant(x, s, -8 * s, 7 * s, axis=-1), fullgraph=True)
    out = fn(x, step)
    out.sum().backward()
    s = step.detach()
    assert_bitwise(out.detach(), fake_quant(x.detach(), s, -8 * s, 7 * s, axis=-1))
    assert step.grad.shape == (32,) and torch.isfinite(step.grad).all()
