// CUDA kernel of gather_logprobs.
//
// Kernel 1 (row_stats): one block per distinct row; each thread streams 16-byte vectors of
// the row, keeping an online (max, sum exp) pair and the first argmax; the block merges them
// with warp shuffles. Bytes moved: the row once. Kernel 2 (finish): one thread per request
// sums its pairs in order (deterministic, no atomics).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "gather_logprobs.h"

namespace {

constexpr int THREADS = 512;

struct Stat {
  float m;     // running max
  float s;     // sum of exp(x - m)
  int64_t a; // first index of the max
  int bad;     // NaN or +inf seen
};

__device__ __forceinline__ void push(Stat& st, float x, int64_t idx) {
  if (!(x - x == 0.0f) && x != -INFINITY) {
    st.bad = 1;
    return;
  }
  if (x > st.m) {
    st.s = st.s * __expf(st.m - x) + 1.0f;
    st.m = x;
    st.a = idx;
  } else if (st.m != -INFINITY) {
    st.s += __expf(x - st.m);
  }
}

__device__ __forceinline__ Stat merge(Stat a, Stat b) {
  Stat r;
  r.bad = a.bad | b.bad;
  if (b.m > a.m || (b.m == a.m && b.a >= 0 && (a.a < 0 || b.a < a.a))) {
    r.m = b.m;
    r.a = b.a;
  } else {
    r.m = a.m;
    r.a = a.a;
  }
  const float sa = a.m == -INFINITY ? 0.0f : a.s * __expf(a.m - r.m);
  const float sb = b.m == -INFINITY ? 0.0f : b.s * __expf(b.m - r.m);
  r.s = sa + sb;
  return r;
}

template <typename T>
struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
};

template <typename T>
__device__ __forceinline__ float tofloat(T x);
template <>
__device__ __forceinline__ float tofloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ float tofloat<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float tofloat<__half>(__half x) { return __half2float(x); }

template <typename T>
__global__ void row_stats_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t V,
                                 const int64_t* __restrict__ rows, float* __restrict__ lse,
                                 int64_t* __restrict__ amax) {
  const int64_t row = rows[blockIdx.x];
  const T* src = logits + row * row_stride;
  Stat st{-INFINITY, 0.0f, -1, 0};
  constexpr int NV = Vec16<T>::N;
  // Vector loads need a 16-byte aligned start: handle a misaligned head element-wise.
  const int64_t mis = (reinterpret_cast<uintptr_t>(src) % 16) / sizeof(T);
  const int64_t head = mis == 0 ? 0 : min(V, (int64_t)(NV - mis));
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) push(st, tofloat<T>(src[i]), i);
  const int64_t nvec = (V - head) / NV;
  const uint4* vsrc = reinterpret_cast<const uint4*>(src + head);
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    uint4 raw = __ldg(vsrc + v);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < NV; ++k) push(st, tofloat<T>(e[k]), head + v * NV + k);
  }
  for (int64_t i = head + nvec * NV + threadIdx.x; i < V; i += blockDim.x)
    push(st, tofloat<T>(src[i]), i);

  // Warp reduction, then across warps through shared memory.
  for (int off = 16; off > 0; off >>= 1) {
    Stat o;
    o.m = __shfl_down_sync(0xffffffff, st.m, off);
    o.s = __shfl_down_sync(0xffffffff, st.s, off);
    o.a = __shfl_down_sync(0xffffffff, st.a, off);
    o.bad = __shfl_down_sync(0xffffffff, st.bad, off);
    st = merge(st, o);
  }
  __shared__ Stat sh[THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < (int)(blockDim.x / 32) ? sh[lane] : Stat{-INFINITY, 0.0f, -1, 0};
    for (int off = 16; off > 0; off >>= 1) {
      Stat o;
      o.m = __shfl_down_sync(0xffffffff, st.m, off);
      o.s = __shfl_down_sync(0xffffffff, st.s, off);
      o.a = __shfl_down_sync(0xffffffff, st.a, off);
      o.bad = __shfl_down_sync(0xffffffff, st.bad, off);
      st = merge(st, o);
    }
    if (lane == 0) {
      if (st.bad || st.a < 0) {
        lse[blockIdx.x] = NAN;
        amax[blockIdx.x] = -1;
      } else {
        lse[blockIdx.x] = st.m + logf(st.s);
        amax[blockIdx.x] = st.a;
      }
    }
  }
}

template <typename T>
__global__ void finish_kernel(const T* __restrict__ logits, int64_t row_stride,
                              const int64_t* __restrict__ row_index,
                              const int64_t* __restrict__ inverse,
                              const int64_t* __restrict__ target,
                              const int64_t* __restrict__ offsets, const float* __restrict__ lse,
                              const int64_t* __restrict__ amax, int64_t N,
                              float* __restrict__ loglik, bool* __restrict__ greedy) {
  const int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (n >= N) return;
  float acc = 0.0f;
  bool g = true;
  for (int64_t i = offsets[n]; i < offsets[n + 1]; ++i) {
    const int64_t u = inverse[i];
    acc += tofloat<T>(logits[row_index[i] * row_stride + target[i]]) - lse[u];
    g = g && (amax[u] == target[i]);
  }
  loglik[n] = acc;
  greedy[n] = g;
}

template <typename T>
void launch(const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& row_index,
            const at::Tensor& inverse, const at::Tensor& target, const at::Tensor& offsets,
            at::Tensor& lse, at::Tensor& amax, at::Tensor& loglik, at::Tensor& greedy) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* lp = reinterpret_cast<const T*>(logits.const_data_ptr());
  const int64_t U = rows.numel();
  if (U > 0) {
    row_stats_kernel<T><<<U, THREADS, 0, stream>>>(
        lp, logits.stride(0), logits.size(1), rows.const_data_ptr<int64_t>(),
        lse.data_ptr<float>(), amax.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t N = offsets.numel() - 1;
  if (N > 0) {
    finish_kernel<T><<<(N + 255) / 256, 256, 0, stream>>>(
        lp, logits.stride(0), row_index.const_data_ptr<int64_t>(),
        inverse.const_data_ptr<int64_t>(), target.const_data_ptr<int64_t>(),
        offsets.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
        amax.const_data_ptr<int64_t>(), N, loglik.data_ptr<float>(), greedy.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_logprobs_cuda(const at::Tensor& logits,
                                                        const at::Tensor& row_index,
                                                        const at::Tensor& target,
                                                        const at::Tensor& request_offsets) {
  TORCH_CHECK(logits.is_cuda(), "gather_logprobs_cuda: logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto ri = row_index.contiguous();
  auto tg = target.contiguous();
  auto off = request_offsets.contiguous();
  auto [rows, inverse, counts] = at::_unique2(ri, /*sorted=*/true, /*return_inverse=*/true,
                                              /*return_counts=*/false);
  inverse = inverse.contiguous();
  auto lse = at::empty({rows.numel()}, logits.options().dtype(at::kFloat));
  auto amax = at::empty({rows.numel()}, logits.options().dtype(at::kLong));
  const int64_t N = off.numel() - 1;
  auto loglik = at::empty({N}, logits.options().dtype(at::kFloat));
  auto greedy = at::empty({N}, logits.options().dtype(at::kBool));
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch<float>(logits, rows, ri, inverse, tg, off, lse, amax, loglik, greedy);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(logits, rows, ri, inverse, tg, off, lse, amax, loglik, greedy);
      break;
    case at::kHalf:
      launch<__half>(logits, rows, ri, inverse, tg, off, lse, amax, loglik, greedy);
      break;
    default:
      TORCH_CHECK(false, "logits dtype must be float32, bfloat16 or float16, got ", logits.scalar_type());
  }
  // One sync to report a bad row by number (NaN/+inf or all -inf), like the CPU path.
  auto bad = at::isnan(lse);
  if (bad.any().item<bool>()) {
    const int64_t u = bad.nonzero().index({0, 0}).item<int64_t>();
    TORCH_CHECK(false, "logits row ", rows.index({u}).item<int64_t>(),
                " contains NaN or +inf, or is entirely -inf: its log-softmax is undefined");
  }
  return {loglik, greedy};
}
