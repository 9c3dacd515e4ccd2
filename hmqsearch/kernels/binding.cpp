// Torch binding of the fused fake-quant kernels in fake_quant.cu (built by
// hmqsearch/kernels/backend.py with torch.utils.cpp_extension.load).
//
// Inputs are validated here, outputs get the strides of torch.empty_like(x) (the register_fake
// contract in ops.py): a dense x (contiguous, channels_last, permuted) is used in place, any
// other x, and a grad whose strides differ from x's, is copied once into that layout.

#include <optional>
#include <tuple>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "fake_quant.h"
#include "fake_quant_module.h"

namespace {

hmq::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return hmq::DType::kFloat32;
    case at::kHalf:
      return hmq::DType::kFloat16;
    case at::kBFloat16:
      return hmq::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fake_quant kernels take float32, float16 or bfloat16, got ",
                  x.scalar_type());
  }
}

// Number of step/lo/hi entries: x.size(axis) per channel, 1 per tensor.
int64_t check_inputs(const at::Tensor& x, const at::Tensor& step, const at::Tensor& lo,
                     const at::Tensor& hi, std::optional<int64_t> axis) {
  TORCH_CHECK(x.is_cuda(), "fake_quant kernels need a CUDA tensor, got ", x.device());
  TORCH_CHECK(!axis || (*axis >= 0 && *axis < x.dim()), "axis ", *axis, " out of range for ",
              x.dim(), "-d input");
  const int64_t channels = axis ? x.size(*axis) : 1;
  for (const at::Tensor* t : {&step, &lo, &hi}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "step/lo/hi must be float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "step/lo/hi must be on ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(t->numel() == channels, "step/lo/hi need ", channels, " element(s), got ",
                t->numel());
  }
  return channels;
}

// Memory-order view of a dense tensor: channel axis a has channels = size(a), inner = stride(a).
hmq::Layout layout_of(const at::Tensor& dense, std::optional<int64_t> axis) {
  const int64_t n = dense.numel();
  if (!axis || dense.size(*axis) == 1) return {1, 1, n};
  const int64_t channels = dense.size(*axis), inner = dense.stride(*axis);
  return {n / (channels * inner), channels, inner};
}

// t laid out with the strides of `like` (same shape and dtype), copied only when they differ.
at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& like) {
  return t.strides() == like.strides() ? t : at::empty_like(like).copy_(t);
}

const float* data(const at::Tensor& contiguous) { return contiguous.data_ptr<float>(); }

at::Tensor forward(const at::Tensor& x, const at::Tensor& step, const at::Tensor& lo,
                   const at::Tensor& hi, std::optional<int64_t> axis) {
  const hmq::DType dtype = dtype_of(x);
  check_inputs(x, step, lo, hi, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor xd = with_strides_of(x, out);
  const at::Tensor s = step.contiguous(), l = lo.contiguous(), h = hi.contiguous();
  C10_CUDA_CHECK(hmq::fake_quant_forward(dtype, xd.data_ptr(), out.data_ptr(), data(s), data(l),
                                         data(h), layout_of(out, axis),
                                         c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& step, const at::Tensor& lo,
    const at::Tensor& hi, std::optional<int64_t> axis, bool param_grads) {
  const hmq::DType dtype = dtype_of(x);
  const int64_t channels = check_inputs(x, step, lo, hi, axis);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              "grad must match x in shape, dtype and device");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  const bool reduce = param_grads && x.numel() > 0;
  const auto param_grad = [&](const at::Tensor& p) {
    return reduce ? at::empty(p.sizes(), p.options()) : at::zeros(p.sizes(), p.options());
  };
  at::Tensor grad_step = param_grad(step), grad_lo = param_grad(lo), grad_hi = param_grad(hi);
  if (x.numel() == 0) return {grad_x, grad_step, grad_lo, grad_hi};

  const at::Tensor xd = with_strides_of(x, grad_x), gd = with_strides_of(grad, grad_x);
  const at::Tensor s = step.contiguous(), l = lo.contiguous(), h = hi.contiguous();
  at::Tensor workspace;
  if (reduce) workspace = at::empty({3 * channels}, x.options().dtype(at::kDouble));
  C10_CUDA_CHECK(hmq::fake_quant_backward(
      dtype, gd.data_ptr(), xd.data_ptr(), grad_x.data_ptr(), data(s), data(l), data(h),
      reduce ? workspace.data_ptr<double>() : nullptr, grad_step.data_ptr<float>(),
      grad_lo.data_ptr<float>(), grad_hi.data_ptr<float>(), layout_of(grad_x, axis),
      c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_step, grad_lo, grad_hi};
}

}  // namespace

HMQ_FAKE_QUANT_MODULE(forward, backward)
HMQ_FAKE_QUANT_LIBRARY(TORCH_EXTENSION_NAME, CUDA, forward, backward)
