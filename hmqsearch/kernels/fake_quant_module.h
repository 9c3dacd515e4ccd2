// The Python interface of both fake-quant extensions (binding.cpp for CUDA, fake_quant_cpu.cpp
// for CPU): hmqsearch/kernels/ops.py calls forward and backward with these signatures, and
// torch.ops.<library>.fake_quant (fake_quant_library.h) for eager calls with autograd in C++.
#pragma once

#include <torch/extension.h>

#include "fake_quant_library.h"

#define HMQ_FAKE_QUANT_MODULE(forward_fn, backward_fn)                              \
  PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {                                        \
    m.def("forward", &forward_fn, "fake-quant forward (x, step, lo, hi, axis) -> out"); \
    m.def("backward", &backward_fn,                                                 \
          "fake-quant backward (grad, x, step, lo, hi, axis, param_grads) -> "      \
          "(grad_x, grad_step, grad_lo, grad_hi)");                                 \
    m.attr("library") = HMQ_STRINGIFY(TORCH_EXTENSION_NAME);                        \
  }
