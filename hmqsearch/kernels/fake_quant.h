// Launchers of the fused fake-quant kernels (fake_quant.cu).  Plain C++ with CUDA runtime
// types only, so that fake_quant.cu compiles without torch headers and the torch binding
// (binding.cpp) is the only file that needs them.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace hmq {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The input in memory order, seen as [outer, channels, inner]: the element at memory offset m
// belongs to channel (m / inner) % channels.  For a dense tensor and channel axis a this is
// channels = size(a), inner = stride(a); per tensor it is {1, 1, numel}.
struct Layout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

// out = step * rint(clamp(x, lo, hi) / step), step/lo/hi indexed by channel (float32); the
// rounding is computed as u + (rint(u) - u) like the reference's round_ste.
cudaError_t fake_quant_forward(DType dtype, const void* x, void* out, const float* step,
                               const float* lo, const float* hi, Layout layout,
                               cudaStream_t stream);

// grad_x = grad where lo <= x <= hi, else 0.  When workspace is not null (3 * channels
// doubles, zeroed here) the same launch also reduces, per channel,
//   grad_step = sum grad * (rint(u) - u), u = clamp(x, lo, hi) / step
//   grad_lo   = sum grad where x < lo,     grad_hi = sum grad where x > hi
// and a second tiny kernel writes them as float32 to grad_step, grad_lo, grad_hi.
// The layout must describe a non-empty tensor (callers handle empty ones).
cudaError_t fake_quant_backward(DType dtype, const void* grad, const void* x, void* grad_x,
                                const float* step, const float* lo, const float* hi,
                                double* workspace, float* grad_step, float* grad_lo,
                                float* grad_hi, Layout layout, cudaStream_t stream);

}  // namespace hmq
