// Fused fake-quant forward and straight-through backward for float32 CPU tensors (built by
// hmqsearch/kernels/backend.py with torch.utils.cpp_extension.load).
//
// The PyTorch implementation (torch_impl.py) makes about 6 passes over memory in the forward
// and 17 in the backward; here each element is read once and written once, with the same
// float32 operation order as hmqsearch.quant.functional.fake_quant_ref (IEEE division,
// round half to even, rounding written as u + (rint(u) - u)), so the forward matches it bit
// for bit. The parameter gradients are summed per channel in double.
//
// The input is seen in memory order as [outer, channels, inner] (fake_quant.h in the CUDA
// sources documents the same view): a segment of `inner` contiguous elements has one channel.

#include <cmath>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "fake_quant_module.h"

namespace {

struct Layout {
  int64_t channels;
  int64_t inner;
};

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task
constexpr int kLanes = 8;            // partial sums per parameter gradient

// torch.minimum(torch.maximum(x, lo), hi): a NaN x stays NaN.
inline float clip(float x, float lo, float hi) {
  const float c = (x > lo || x != x) ? x : lo;
  return (c < hi || c != c) ? c : hi;
}

void check_inputs(const at::Tensor& x, const at::Tensor& step, const at::Tensor& lo,
                  const at::Tensor& hi, std::optional<int64_t> axis) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "the CPU fake_quant kernel takes a float32 CPU tensor, got ", x.scalar_type(),
              " on ", x.device());
  TORCH_CHECK(!axis || (*axis >= 0 && *axis < x.dim()), "axis ", *axis, " out of range for ",
              x.dim(), "-d input");
  const int64_t channels = axis ? x.size(*axis) : 1;
  for (const at::Tensor* t : {&step, &lo, &hi}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "step/lo/hi must be float32 CPU tensors");
    TORCH_CHECK(t->numel() == channels, "step/lo/hi need ", channels, " element(s), got ",
                t->numel());
  }
}

// x made contiguous; channels = size(axis), inner = elements after the axis.
Layout layout_of(const at::Tensor& contiguous, std::optional<int64_t> axis) {
  if (!axis) return {1, std::max<int64_t>(contiguous.numel(), 1)};
  return {contiguous.size(*axis), contiguous.stride(*axis)};
}

// Calls body(channel, first, last) for the channel segments inside [begin, end).
template <typename Body>
void for_segments(const Layout& l, int64_t begin, int64_t end, Body body) {
  int64_t m = begin;
  while (m < end) {
    const int64_t row = m / l.inner;
    const int64_t last = std::min(end, (row + 1) * l.inner);
    body(row % l.channels, m, last);
    m = last;
  }
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& step, const at::Tensor& lo,
                   const at::Tensor& hi, std::optional<int64_t> axis) {
  check_inputs(x, step, lo, hi, axis);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const Layout l = layout_of(xc, axis);
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const at::Tensor s = step.contiguous(), lw = lo.contiguous(), hg = hi.contiguous();
  const float *sp = s.data_ptr<float>(), *lp = lw.data_ptr<float>(), *hp = hg.data_ptr<float>();
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for_segments(l, begin, end, [&](int64_t c, int64_t first, int64_t last) {
      const float st = sp[c], lo_c = lp[c], hi_c = hp[c];
      for (int64_t m = first; m < last; ++m) {
        const float u = clip(xp[m], lo_c, hi_c) / st;
        op[m] = (u + (std::nearbyint(u) - u)) * st;
      }
    });
  });
  return x.is_contiguous() ? out : at::empty_like(x).copy_(out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& step, const at::Tensor& lo,
    const at::Tensor& hi, std::optional<int64_t> axis, bool param_grads) {
  check_inputs(x, step, lo, hi, axis);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "grad must match x in shape and dtype");
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  const Layout l = layout_of(xc, axis);
  const float *xp = xc.data_ptr<float>(), *gp = gc.data_ptr<float>();
  float* gx = grad_x.data_ptr<float>();
  const at::Tensor s = step.contiguous(), lw = lo.contiguous(), hg = hi.contiguous();
  const float *sp = s.data_ptr<float>(), *lp = lw.data_ptr<float>(), *hp = hg.data_ptr<float>();

  std::vector<double> sums(param_grads ? 3 * l.channels : 0, 0.0);  // step, lo, hi per channel
  std::mutex merge;
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t begin, int64_t end) {
    std::vector<double> local(sums.size(), 0.0);
    for_segments(l, begin, end, [&](int64_t c, int64_t first, int64_t last) {
      const float st = sp[c], lo_c = lp[c], hi_c = hp[c];
      if (!param_grads) {
        for (int64_t m = first; m < last; ++m) {
          gx[m] = (xp[m] >= lo_c && xp[m] <= hi_c) ? gp[m] : 0.f;
        }
        return;
      }
      // kLanes independent partial sums: the loop vectorises without reordering a float sum.
      float s_step[kLanes] = {}, s_lo[kLanes] = {}, s_hi[kLanes] = {};
      int64_t m = first;
      for (; m + kLanes <= last; m += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          const float xv = xp[m + k], g = gp[m + k];
          const float u = clip(xv, lo_c, hi_c) / st;
          s_step[k] += g * (std::nearbyint(u) - u);
          s_lo[k] += xv < lo_c ? g : 0.f;
          s_hi[k] += xv > hi_c ? g : 0.f;
          gx[m + k] = (xv >= lo_c && xv <= hi_c) ? g : 0.f;
        }
      }
      for (int k = 0; m < last; ++m, ++k) {
        const float xv = xp[m], g = gp[m];
        const float u = clip(xv, lo_c, hi_c) / st;
        s_step[k] += g * (std::nearbyint(u) - u);
        s_lo[k] += xv < lo_c ? g : 0.f;
        s_hi[k] += xv > hi_c ? g : 0.f;
        gx[m] = (xv >= lo_c && xv <= hi_c) ? g : 0.f;
      }
      for (int k = 0; k < kLanes; ++k) {
        local[3 * c] += s_step[k];
        local[3 * c + 1] += s_lo[k];
        local[3 * c + 2] += s_hi[k];
      }
    });
    if (param_grads) {
      const std::lock_guard<std::mutex> lock(merge);
      for (size_t k = 0; k < local.size(); ++k) sums[k] += local[k];
    }
  });

  at::Tensor grad_step = at::zeros(step.sizes(), step.options());
  at::Tensor grad_lo = at::zeros(lo.sizes(), lo.options());
  at::Tensor grad_hi = at::zeros(hi.sizes(), hi.options());
  if (param_grads) {
    float *ps = grad_step.data_ptr<float>(), *pl = grad_lo.data_ptr<float>(),
          *ph = grad_hi.data_ptr<float>();
    for (int64_t c = 0; c < l.channels; ++c) {
      ps[c] = static_cast<float>(sums[3 * c]);
      pl[c] = static_cast<float>(sums[3 * c + 1]);
      ph[c] = static_cast<float>(sums[3 * c + 2]);
    }
  }
  if (!x.is_contiguous()) grad_x = at::empty_like(x).copy_(grad_x);
  return {grad_x, grad_step, grad_lo, grad_hi};
}

}  // namespace

HMQ_FAKE_QUANT_MODULE(forward, backward)
HMQ_FAKE_QUANT_LIBRARY(TORCH_EXTENSION_NAME, CPU, forward, backward)
