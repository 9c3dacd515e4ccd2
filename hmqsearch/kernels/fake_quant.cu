// Fused fake-quant kernels: out = step * rint(clamp(x, lo, hi) / step) and its
// straight-through backward, with the same operation order as
// hmqsearch.quant.functional.fake_quant_ref (IEEE division, no reciprocal, half-to-even,
// rounding written as u + (rint(u) - u) like its round_ste), so the float32 results match
// the reference bit for bit.
//
// Two layouts of the [outer, channels, inner] view (see fake_quant.h):
// * rows    (inner >= kColumnThreshold, per tensor): rows of `inner` contiguous elements,
//           one channel per row; a block takes a chunk of one row, so its channel is fixed,
//           loads are 16-byte vectors when possible, and a block reduction feeds 3 atomics.
// * columns (short inner, e.g. channel axis last): a [outer, channels * inner] matrix, one
//           column per thread (fixed channel), rows split over threadIdx.y and blockIdx.y;
//           column sums are combined per channel with a segmented warp reduction.
// Every input element is read once and every output element written once.

#include "fake_quant.h"

#include <algorithm>
#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hmq {
namespace {

constexpr int kThreads = 256;           // rows kernel block size
constexpr int kUnroll = 4;              // independent loads in flight per thread
constexpr int kColWarps = 8;            // columns kernel: blockDim = (32, kColWarps)
constexpr int64_t kColumnThreshold = 256;
constexpr int64_t kMinRowsPerBlock = 64;
constexpr int kBlocksPerSm = 32;        // rows kernel: target grid size per SM
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct Params {
  float step, lo, hi;
};

struct Sums {
  float step = 0.f, lo = 0.f, hi = 0.f;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// torch.minimum(torch.maximum(x, lo), hi) as ATen's vectorized CPU kernels compute it:
// a NaN operand gives NaN, otherwise max = (a > b ? a : b), min = (a < b ? a : b).
__device__ __forceinline__ float clip(float x, const Params& p) {
  const float c = (x > p.lo || x != x) ? x : p.lo;
  return (c < p.hi || c != c) ? c : p.hi;
}

// step * (u + (rint(u) - u)), u = clip(x) / step: the reference's straight-through rounding
// round_ste(u) step by step.  It equals rint(u) except that zeros come out as +0 and an
// infinite u (zero or tiny step) gives NaN.
__device__ __forceinline__ float quantize(float x, const Params& p) {
  const float u = __fdiv_rn(clip(x, p), p.step);
  return __fmul_rn(__fadd_rn(u, __fsub_rn(rintf(u), u)), p.step);
}

// Straight-through backward of one element: returns grad_x, accumulates the parameter sums.
__device__ __forceinline__ float backward_one(float x, float g, const Params& p, Sums& s) {
  const float u = __fdiv_rn(clip(x, p), p.step);
  s.step += g * (rintf(u) - u);
  s.lo += x < p.lo ? g : 0.f;
  s.hi += x > p.hi ? g : 0.f;
  return (x >= p.lo && x <= p.hi) ? g : 0.f;
}

template <bool kBackward, typename T, int N>
__device__ __forceinline__ Pack<T, N> apply(const Pack<T, N>& x, const Pack<T, N>& g,
                                            const Params& p, Sums& s) {
  Pack<T, N> out;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float xv = to_float(x.v[j]);
    out.v[j] = from_float<T>(kBackward ? backward_one(xv, to_float(g.v[j]), p, s)
                                       : quantize(xv, p));
  }
  return out;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum of every thread's Sums in a 1-D block of kThreads, added to the channel's accumulators.
__device__ void block_add(Sums s, double* acc, int64_t channel, int64_t channels) {
  __shared__ float part[3][kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  s.step = warp_sum(s.step);
  s.lo = warp_sum(s.lo);
  s.hi = warp_sum(s.hi);
  if (lane == 0) {
    part[0][warp] = s.step;
    part[1][warp] = s.lo;
    part[2][warp] = s.hi;
  }
  __syncthreads();
  if (warp == 0) {
    const bool has = lane < kThreads / 32;
    const float a = warp_sum(has ? part[0][lane] : 0.f);
    const float b = warp_sum(has ? part[1][lane] : 0.f);
    const float c = warp_sum(has ? part[2][lane] : 0.f);
    if (lane == 0) {
      atomicAdd(acc + channel, static_cast<double>(a));
      atomicAdd(acc + channels + channel, static_cast<double>(b));
      atomicAdd(acc + 2 * channels + channel, static_cast<double>(c));
    }
  }
}

// One block per chunk of one row; rows have row_len elements and belong to channel row % channels.
template <typename T, int N, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ y,
                const float* __restrict__ step, const float* __restrict__ lo,
                const float* __restrict__ hi, double* __restrict__ acc, int64_t row_len,
                int64_t channels, int64_t chunks_per_row, int64_t chunk_len) {
  using P = Pack<T, N>;
  const int64_t row = blockIdx.x / chunks_per_row;
  const int64_t start = (blockIdx.x - row * chunks_per_row) * chunk_len;
  const int packs = static_cast<int>(min(chunk_len, row_len - start) / N);
  const int64_t channel = row % channels;
  const Params p{step[channel], lo[channel], hi[channel]};
  const int64_t base = row * row_len + start;
  const P* xs = reinterpret_cast<const P*>(x + base);
  const P* gs = kBackward ? reinterpret_cast<const P*>(g + base) : nullptr;
  P* ys = reinterpret_cast<P*>(y + base);

  Sums s;
  int i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < packs; i += kUnroll * kThreads) {
    P xv[kUnroll], gv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      xv[u] = xs[i + u * kThreads];
      if (kBackward) gv[u] = gs[i + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ys[i + u * kThreads] = apply<kBackward>(xv[u], kBackward ? gv[u] : xv[u], p, s);
    }
  }
  for (; i < packs; i += kThreads) {
    const P xv = xs[i];
    ys[i] = apply<kBackward>(xv, kBackward ? gs[i] : xv, p, s);
  }
  if (kBackward && acc != nullptr) block_add(s, acc, channel, channels);
}

// Thread (tx, ty) of block (bx, by) handles column bx * 32 + tx, rows by * rows_per_block + ty,
// + kColWarps, ...; column col belongs to channel col / inner.
template <typename T, bool kBackward>
__global__ void __launch_bounds__(32 * kColWarps)
    columns_kernel(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ y,
                   const float* __restrict__ step, const float* __restrict__ lo,
                   const float* __restrict__ hi, double* __restrict__ acc, int64_t rows,
                   int64_t cols, int64_t inner, int64_t channels, int64_t rows_per_block) {
  using P = Pack<T, 1>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const bool active = col < cols;
  // Inactive lanes sit at the end of the last warp; INT_MAX keeps channels non-decreasing.
  const int channel = active ? static_cast<int>(col / inner) : INT_MAX;
  const Params p = active ? Params{step[channel], lo[channel], hi[channel]} : Params{1.f, 0.f, 0.f};
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = min(rows, r0 + rows_per_block);
  const P* xs = reinterpret_cast<const P*>(x) + col;
  const P* gs = kBackward ? reinterpret_cast<const P*>(g) + col : nullptr;
  P* ys = reinterpret_cast<P*>(y) + col;

  Sums s;
  if (active) {
    int64_t r = r0 + threadIdx.y;
    for (; r + (kUnroll - 1) * kColWarps < r1; r += kUnroll * kColWarps) {
      P xv[kUnroll], gv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        xv[u] = xs[(r + u * kColWarps) * cols];
        if (kBackward) gv[u] = gs[(r + u * kColWarps) * cols];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        ys[(r + u * kColWarps) * cols] = apply<kBackward>(xv[u], kBackward ? gv[u] : xv[u], p, s);
    }
    for (; r < r1; r += kColWarps) {
      const P xv = xs[r * cols];
      ys[r * cols] = apply<kBackward>(xv, kBackward ? gs[r * cols] : xv, p, s);
    }
  }
  if (!kBackward || acc == nullptr) return;

  __shared__ float part[3][kColWarps][32];
  part[0][threadIdx.y][threadIdx.x] = s.step;
  part[1][threadIdx.y][threadIdx.x] = s.lo;
  part[2][threadIdx.y][threadIdx.x] = s.hi;
  __syncthreads();
  if (threadIdx.y != 0) return;
  float v[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    v[k] = 0.f;
#pragma unroll
    for (int w = 0; w < kColWarps; ++w) v[k] += part[k][w][threadIdx.x];
  }
  // Segmented reduction: channels are non-decreasing along the lanes, so after step o lane l
  // holds the sum over lanes [l, l + 2o) of its own channel; segment heads hold the totals.
  const int lane = threadIdx.x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int other = __shfl_down_sync(kFullMask, channel, o);
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const float w = __shfl_down_sync(kFullMask, v[k], o);
      if (lane + o < 32 && other == channel) v[k] += w;
    }
  }
  const int previous = __shfl_up_sync(kFullMask, channel, 1);
  if (active && (lane == 0 || previous != channel)) {
#pragma unroll
    for (int k = 0; k < 3; ++k) atomicAdd(acc + k * channels + channel, static_cast<double>(v[k]));
  }
}

__global__ void finish_kernel(const double* __restrict__ acc, float* __restrict__ grad_step,
                              float* __restrict__ grad_lo, float* __restrict__ grad_hi,
                              int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  grad_step[c] = static_cast<float>(acc[c]);
  grad_lo[c] = static_cast<float>(acc[channels + c]);
  grad_hi[c] = static_cast<float>(acc[2 * channels + c]);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

cudaError_t sm_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

// Launches the forward (g == nullptr) or backward kernel of one layout; no error check.
template <typename T, bool kBackward>
cudaError_t launch(const T* x, const T* g, T* y, const float* step, const float* lo,
                   const float* hi, double* acc, Layout l, cudaStream_t stream) {
  if (l.inner < kColumnThreshold) {
    const int64_t rows = l.outer, cols = l.channels * l.inner;
    // gridDim.y is at most 65535: longer column strips per block when there are many rows.
    const int64_t rows_per_block =
        ceil_div(std::max(kMinRowsPerBlock, ceil_div(rows, 65535)), kColWarps) * kColWarps;
    if (ceil_div(cols, 32) > INT_MAX) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(ceil_div(cols, 32)),
                    static_cast<unsigned>(ceil_div(rows, rows_per_block)));
    columns_kernel<T, kBackward><<<grid, dim3(32, kColWarps), 0, stream>>>(
        x, g, y, step, lo, hi, acc, rows, cols, l.inner, l.channels, rows_per_block);
    return cudaSuccess;
  }
  constexpr int kVec = 16 / sizeof(T);
  const int64_t rows = l.outer * l.channels, row_len = l.inner;
  const bool vec = row_len % kVec == 0 && aligned16(x) && aligned16(y) && (!g || aligned16(g));
  const int64_t granule = kThreads * (vec ? kVec : 1);
  int sms = 0;
  if (cudaError_t err = sm_count(&sms); err != cudaSuccess) return err;
  const int64_t target_blocks = static_cast<int64_t>(sms) * kBlocksPerSm;
  const int64_t wanted = std::min(ceil_div(target_blocks, rows), ceil_div(row_len, granule));
  const int64_t chunk_len = ceil_div(ceil_div(row_len, wanted), granule) * granule;  // wanted >= 1
  const int64_t chunks_per_row = ceil_div(row_len, chunk_len);
  const int64_t blocks = rows * chunks_per_row;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(blocks);
  if (vec) {
    rows_kernel<T, kVec, kBackward><<<grid, kThreads, 0, stream>>>(
        x, g, y, step, lo, hi, acc, row_len, l.channels, chunks_per_row, chunk_len);
  } else {
    rows_kernel<T, 1, kBackward><<<grid, kThreads, 0, stream>>>(
        x, g, y, step, lo, hi, acc, row_len, l.channels, chunks_per_row, chunk_len);
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t backward_typed(const void* grad, const void* x, void* grad_x, const float* step,
                           const float* lo, const float* hi, double* workspace,
                           float* grad_step, float* grad_lo, float* grad_hi, Layout l,
                           cudaStream_t stream) {
  if (workspace != nullptr) {
    const cudaError_t err = cudaMemsetAsync(workspace, 0, 3 * l.channels * sizeof(double), stream);
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err =
      launch<T, true>(static_cast<const T*>(x), static_cast<const T*>(grad),
                      static_cast<T*>(grad_x), step, lo, hi, workspace, l, stream);
  if (err != cudaSuccess) return err;
  if (workspace != nullptr) {
    finish_kernel<<<static_cast<unsigned>(ceil_div(l.channels, 256)), 256, 0, stream>>>(
        workspace, grad_step, grad_lo, grad_hi, l.channels);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t fake_quant_forward(DType dtype, const void* x, void* out, const float* step,
                               const float* lo, const float* hi, Layout layout,
                               cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      err = launch<float, false>(static_cast<const float*>(x), nullptr, static_cast<float*>(out),
                                 step, lo, hi, nullptr, layout, stream);
      break;
    case DType::kFloat16:
      err = launch<__half, false>(static_cast<const __half*>(x), nullptr,
                                  static_cast<__half*>(out), step, lo, hi, nullptr, layout, stream);
      break;
    case DType::kBFloat16:
      err = launch<__nv_bfloat16, false>(static_cast<const __nv_bfloat16*>(x), nullptr,
                                         static_cast<__nv_bfloat16*>(out), step, lo, hi, nullptr,
                                         layout, stream);
      break;
  }
  return err == cudaSuccess ? cudaGetLastError() : err;
}

cudaError_t fake_quant_backward(DType dtype, const void* grad, const void* x, void* grad_x,
                                const float* step, const float* lo, const float* hi,
                                double* workspace, float* grad_step, float* grad_lo,
                                float* grad_hi, Layout layout, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(grad, x, grad_x, step, lo, hi, workspace, grad_step, grad_lo,
                                   grad_hi, layout, stream);
    case DType::kFloat16:
      return backward_typed<__half>(grad, x, grad_x, step, lo, hi, workspace, grad_step, grad_lo,
                                    grad_hi, layout, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad, x, grad_x, step, lo, hi, workspace, grad_step,
                                           grad_lo, grad_hi, layout, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hmq
