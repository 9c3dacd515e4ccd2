// The fake-quant op with its autograd in C++: `<extension name>::fake_quant(x, step, lo, hi,
// axis)` registered with the dispatcher (TORCH_LIBRARY) by each extension (binding.cpp for CUDA,
// fake_quant_cpu.cpp for CPU), its backward a torch::autograd::Function, so an eager call and
// its backward run without Python (hmqsearch/kernels/ops.py calls it through torch.ops).
//
// The op namespace is the extension's name (TORCH_EXTENSION_NAME, versioned by
// torch.utils.cpp_extension when it rebuilds in a running process); the Python module exposes
// it as `library`. Gradients are the straight-through rule of the extension's `backward`; the
// parameter gradients are reduced only when autograd asks for one of them.
#pragma once

#include <optional>
#include <tuple>

#include <torch/extension.h>
#include <torch/library.h>

namespace hmq {

using ForwardFn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, std::optional<int64_t>);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, std::optional<int64_t>, bool);

template <ForwardFn kForward, BackwardFn kBackward>
struct FakeQuantFunction : public torch::autograd::Function<FakeQuantFunction<kForward, kBackward>> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& step, const at::Tensor& lo, const at::Tensor& hi,
                            std::optional<int64_t> axis) {
    ctx->save_for_backward({x, step, lo, hi});
    ctx->saved_data["axis"] = axis;
    return kForward(x, step, lo, hi, axis);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::optional<int64_t> axis = ctx->saved_data["axis"].toOptional<int64_t>();
    const bool param_grads =
        ctx->needs_input_grad(1) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3);
    auto [grad_x, grad_step, grad_lo, grad_hi] =
        kBackward(grads[0], saved[0], saved[1], saved[2], saved[3], axis, param_grads);
    const auto keep = [&](size_t i, at::Tensor& g) {
      return ctx->needs_input_grad(i) ? g : at::Tensor();
    };
    return {keep(0, grad_x), keep(1, grad_step), keep(2, grad_lo), keep(3, grad_hi), at::Tensor()};
  }
};

template <ForwardFn kForward, BackwardFn kBackward>
at::Tensor fake_quant_autograd(const at::Tensor& x, const at::Tensor& step, const at::Tensor& lo,
                               const at::Tensor& hi, std::optional<int64_t> axis) {
  return FakeQuantFunction<kForward, kBackward>::apply(x, step, lo, hi, axis);
}

}  // namespace hmq

#define HMQ_STRINGIFY_(x) #x
#define HMQ_STRINGIFY(x) HMQ_STRINGIFY_(x)

// Registers ns::fake_quant: `forward_fn` for dispatch key `key` (CPU or CUDA) and the autograd
// wrapper for every Autograd key. One level of macro so that ns (TORCH_EXTENSION_NAME) expands.
#define HMQ_FAKE_QUANT_LIBRARY(ns, key, forward_fn, backward_fn)                                 \
  TORCH_LIBRARY(ns, m) {                                                                         \
    m.def("fake_quant(Tensor x, Tensor step, Tensor lo, Tensor hi, int? axis) -> Tensor");     \
  }                                                                                              \
  TORCH_LIBRARY_IMPL(ns, key, m) { m.impl("fake_quant", &forward_fn); }                         \
  TORCH_LIBRARY_IMPL(ns, Autograd, m) {                                                          \
    m.impl("fake_quant", &hmq::fake_quant_autograd<&forward_fn, &backward_fn>);                  \
  }
