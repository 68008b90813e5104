// CUDA kernels of gather_logprobs.
//
// check_mark: one thread per pair and per offset: checks every row_index / target / offset value
//            (range, offsets from 0 to M, non-decreasing) and sets needed[r] = 1 for every VALID
//            row named in row_index (idempotent stores: no sort, no unique). A bad value sets a
//            bit in the argument flags (atomicOr, only by the threads that see one) and is never
//            used as an address, so bad input cannot read or write outside the tensors. Its
//            thread 0 also resets the smallest-bad-row slot (no host-to-device copy per call).
// row_stats: the log-sum-exp and first argmax of every needed row, in one pass over it. Bytes
//            moved: each needed row once. Four variants, picked per call by the environment
//            variable WMDP_FAST_GATHER_CUDA_VARIANT (read in bindings.cpp; unset = 3):
//   1        one block of 256 threads per row, returning at once for rows nobody asked for.
//            Each thread streams 16-byte vectors; per vector it takes the max first and
//            rescales its running sum at most once, then adds exp(x - m) for the vector's
//            elements (max / sub / exp2 / add, no per-element branch), and tests every element
//            for NaN/+inf. (59% of copy bandwidth at 16,384 x 32,000 bf16 on an H200.)
//   2        one block per row; each thread issues 4 independent 16-byte loads before it uses
//            any (more bytes in flight per thread), folds the 4 vectors as one chunk, and finds
//            bad rows from the final (max, sum) instead of per element (row_stats_v2.cuh says
//            why that is exact).
//   3 (default: the fastest on an H200, 96% of copy bandwidth in bf16, within noise of the
//            others in float32) as 2, but one warp per row (8 rows per 256-thread block): no
//            block barrier, a longer stream per thread.
//   4        as 2 with 8 loads in flight per thread.
//            All variants keep the first-index tie rule and compute exp(x - m) with the
//            subtraction first. The block or warp merges the (max, sum, first argmax) triples
//            with warp shuffles.
// finish:    one thread per request sums its pairs in order (deterministic, no atomics). It
//            returns at once when check_mark flagged an argument (its offsets, rows and targets
//            would be addresses).
// A bad row (NaN/+inf, or only -inf) sets a flag and the smallest such row id (atomicOr/atomicMin:
// order-independent). The host reads the flags back ONCE, after every launch (the only device
// sync of a call), and bindings.cpp raises the argument error or the bad-row error from them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "gather_logprobs.h"
#include "row_stats_v2.cuh"

namespace {

constexpr int THREADS = 256;
constexpr float LOG2E = 1.4426950408889634f;
// The int32 flags read back after the launch (zeroed with the row map, one fill per call):
constexpr int FLAG_BAD_ROW = 0;     // some needed row holds NaN/+inf or only -inf
constexpr int FLAG_BAD_ROW_ID = 1;  // the smallest such row (reset to INT32_MAX by check_mark)
constexpr int FLAG_ARGS = 2;        // GATHER_ARG_* bits of gather_logprobs.h
constexpr int NUM_FLAGS = 4;        // 16 bytes
constexpr int ARG_ROW_INDEX = GATHER_ARG_ROW_INDEX;
constexpr int ARG_TARGET = GATHER_ARG_TARGET;
constexpr int ARG_OFFSETS = GATHER_ARG_OFFSETS;

struct Stat {
  float m;    // running max
  float s;    // sum of exp(x - m)
  int64_t a;  // first index of the max (-1: none yet)
  int bad;    // NaN or +inf seen
};

__device__ __forceinline__ Stat merge(Stat a, Stat b) {
  Stat r;
  r.bad = a.bad | b.bad;
  // max, ties to the smaller index (torch.argmax's first-index rule)
  const bool take_b = (b.a >= 0) && (a.a < 0 || b.m > a.m || (b.m == a.m && b.a < a.a));
  r.m = take_b ? b.m : a.m;
  r.a = take_b ? b.a : a.a;
  const float sa = a.a < 0 ? 0.0f : a.s * exp2f((a.m - r.m) * LOG2E);
  const float sb = b.a < 0 ? 0.0f : b.s * exp2f((b.m - r.m) * LOG2E);
  r.s = sa + sb;
  return r;
}

template <typename T>
__device__ __forceinline__ float tofloat(T x);
template <>
__device__ __forceinline__ float tofloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ float tofloat<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float tofloat<__half>(__half x) { return __half2float(x); }

// Fold K values starting at index `base` into the thread's Stat.
template <int K>
__device__ __forceinline__ void fold(Stat& st, const float (&x)[K], int64_t base) {
  float vm = x[0];
  int vi = 0;
  int nonfinite = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    // NaN and +inf are the values with x - x != 0 other than -inf
    nonfinite |= !(x[k] - x[k] == 0.0f) && x[k] != -INFINITY;
    if (x[k] > vm) {
      vm = x[k];
      vi = k;
    }
  }
  st.bad |= nonfinite;
  if (vm == -INFINITY) return;  // contributes nothing (and -inf - -inf would be NaN)
  if (st.a < 0 || vm > st.m) {
    st.s = st.a < 0 ? 0.0f : st.s * exp2f((st.m - vm) * LOG2E);
    st.m = vm;
    st.a = base + vi;
  }
  // (x - m) first: exact for nearby values, so logits of size 1e4 keep their precision
  float acc = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) acc += exp2f((x[k] - st.m) * LOG2E);
  st.s += acc;
}

__device__ __forceinline__ Stat shfl_merge(Stat st, int off) {
  Stat o;
  o.m = __shfl_down_sync(0xffffffff, st.m, off);
  o.s = __shfl_down_sync(0xffffffff, st.s, off);
  o.a = __shfl_down_sync(0xffffffff, st.a, off);
  o.bad = __shfl_down_sync(0xffffffff, st.bad, off);
  return merge(st, o);
}

__global__ void check_mark_kernel(const int64_t* __restrict__ row_index,
                                  const int64_t* __restrict__ target, int64_t M,
                                  const int64_t* __restrict__ offsets, int64_t N, int64_t R,
                                  int64_t V, unsigned char* __restrict__ needed,
                                  int* __restrict__ flags) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i == 0) flags[FLAG_BAD_ROW_ID] = INT32_MAX;  // row_stats runs after this kernel
  int bits = 0;
  if (i < M) {
    const int64_t r = row_index[i];
    if (r >= 0 && r < R) {
      needed[r] = 1;
    } else {
      bits |= ARG_ROW_INDEX;
    }
    const int64_t t = target[i];
    if (t < 0 || t >= V) bits |= ARG_TARGET;
  }
  if (i <= N) {
    const int64_t o = offsets[i];
    if ((i == 0 && o != 0) || (i == N && o != M) || (i > 0 && o < offsets[i - 1])) {
      bits |= ARG_OFFSETS;
    }
  }
  if (bits != 0) atomicOr(flags + FLAG_ARGS, bits);
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
    row_stats_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t V,
                     const unsigned char* __restrict__ needed, float* __restrict__ lse,
                     int64_t* __restrict__ amax, int* __restrict__ bad_flag,
                     int* __restrict__ bad_row) {
  const int64_t row = blockIdx.x;
  if (!needed[row]) return;
  const T* src = logits + row * row_stride;
  Stat st{-INFINITY, 0.0f, -1, 0};
  constexpr int NV = 16 / sizeof(T);
  // Vector loads need a 16-byte aligned start: a misaligned head goes element by element.
  const int64_t mis = (reinterpret_cast<uintptr_t>(src) % 16) / sizeof(T);
  const int64_t head = mis == 0 ? 0 : min(V, (int64_t)(NV - mis));
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    const float x[1] = {tofloat<T>(src[i])};
    fold<1>(st, x, i);
  }
  const int64_t nvec = (V - head) / NV;
  const uint4* vsrc = reinterpret_cast<const uint4*>(src + head);
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    const uint4 raw = __ldg(vsrc + v);
    const T* e = reinterpret_cast<const T*>(&raw);
    float x[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) x[k] = tofloat<T>(e[k]);
    fold<NV>(st, x, head + v * NV);
  }
  for (int64_t i = head + nvec * NV + threadIdx.x; i < V; i += blockDim.x) {
    const float x[1] = {tofloat<T>(src[i])};
    fold<1>(st, x, i);
  }

  for (int off = 16; off > 0; off >>= 1) st = shfl_merge(st, off);
  __shared__ Stat sh[THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < THREADS / 32 ? sh[lane] : Stat{-INFINITY, 0.0f, -1, 0};
    for (int off = 16; off > 0; off >>= 1) st = shfl_merge(st, off);
    if (lane == 0) {
      if (st.bad || st.a < 0) {
        lse[row] = NAN;
        amax[row] = -1;
        atomicOr(bad_flag, 1);
        atomicMin(bad_row, (int)min(row, (int64_t)INT32_MAX));
      } else {
        lse[row] = st.m + logf(st.s);
        amax[row] = st.a;
      }
    }
  }
}

// Variants 2-4: G threads per row (G = THREADS: a block per row; G = 32: a warp per row), U
// loads in flight per thread. The per-thread math is in row_stats_v2.cuh.
__device__ __forceinline__ wmdp_v2::Stat shfl_merge_v2(wmdp_v2::Stat st, int off) {
  wmdp_v2::Stat o;
  o.m = __shfl_down_sync(0xffffffff, st.m, off);
  o.s = __shfl_down_sync(0xffffffff, st.s, off);
  o.a = __shfl_down_sync(0xffffffff, st.a, off);
  return wmdp_v2::merge(st, o);
}

template <typename T, int U, int G>
__global__ void __launch_bounds__(THREADS)
    row_stats_v2_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t R, int64_t V,
                        const unsigned char* __restrict__ needed, float* __restrict__ lse,
                        int64_t* __restrict__ amax, int* __restrict__ bad_flag,
                        int* __restrict__ bad_row) {
  static_assert(G == 32 || G == THREADS, "a row belongs to one warp or one block");
  constexpr int RPB = THREADS / G;
  const int64_t row = (int64_t)blockIdx.x * RPB + threadIdx.x / G;
  // G == THREADS: the whole block leaves; G == 32: one warp (no block barrier below)
  if (row >= R || !needed[row]) return;
  const int t = threadIdx.x % G;
  wmdp_v2::Stat st = wmdp_v2::thread_stat<T, U, G>(logits + row * row_stride, V, t);
  for (int off = 16; off > 0; off >>= 1) st = shfl_merge_v2(st, off);
  if constexpr (G == THREADS) {
    __shared__ wmdp_v2::Stat sh[THREADS / 32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) sh[warp] = st;
    __syncthreads();
    if (warp != 0) return;
    st = lane < THREADS / 32 ? sh[lane] : wmdp_v2::Stat{-INFINITY, 0.0f, -1};
    for (int off = 16; off > 0; off >>= 1) st = shfl_merge_v2(st, off);
  }
  if (t == 0) {
    float l;
    if (wmdp_v2::finish(st, &l)) {
      lse[row] = l;
      amax[row] = st.a;
    } else {
      lse[row] = NAN;
      amax[row] = -1;
      atomicOr(bad_flag, 1);
      atomicMin(bad_row, (int)min(row, (int64_t)INT32_MAX));
    }
  }
}

template <typename T>
__global__ void finish_kernel(const T* __restrict__ logits, int64_t row_stride,
                              const int64_t* __restrict__ row_index,
                              const int64_t* __restrict__ target,
                              const int64_t* __restrict__ offsets, const float* __restrict__ lse,
                              const int64_t* __restrict__ amax, int64_t N,
                              const int* __restrict__ arg_flags, float* __restrict__ loglik,
                              bool* __restrict__ greedy) {
  const int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  // bad arguments: the outputs are never returned (bindings.cpp raises), nothing is read
  if (n >= N || *arg_flags != 0) return;
  float acc = 0.0f;
  bool g = true;
  for (int64_t i = offsets[n]; i < offsets[n + 1]; ++i) {
    const int64_t r = row_index[i];
    acc += tofloat<T>(logits[r * row_stride + target[i]]) - lse[r];
    g = g && (amax[r] == target[i]);
  }
  loglik[n] = acc;
  greedy[n] = g;
}

template <typename T, int U, int G>
void launch_row_stats_v2(const at::Tensor& logits, const unsigned char* needed, float* lse,
                         int64_t* amax, int* flags, cudaStream_t stream) {
  constexpr int RPB = THREADS / G;
  const int64_t R = logits.size(0);
  row_stats_v2_kernel<T, U, G><<<(R + RPB - 1) / RPB, THREADS, 0, stream>>>(
      reinterpret_cast<const T*>(logits.const_data_ptr()), logits.stride(0), R, logits.size(1),
      needed, lse, amax, flags + FLAG_BAD_ROW, flags + FLAG_BAD_ROW_ID);
}

// Queues every kernel of one call on the current stream; nothing here waits for the device.
template <typename T>
void launch(const at::Tensor& logits, const at::Tensor& row_index, const at::Tensor& target,
            const at::Tensor& offsets, int variant, unsigned char* needed, int* flags,
            at::Tensor& lse, at::Tensor& amax, at::Tensor& loglik, at::Tensor& greedy) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* lp = reinterpret_cast<const T*>(logits.const_data_ptr());
  const int64_t R = logits.size(0);
  const int64_t V = logits.size(1);
  const int64_t M = row_index.numel();
  const int64_t N = offsets.numel() - 1;
  const int64_t checks = M > N + 1 ? M : N + 1;  // one thread per pair and per offset
  check_mark_kernel<<<(checks + 255) / 256, 256, 0, stream>>>(
      row_index.const_data_ptr<int64_t>(), target.const_data_ptr<int64_t>(), M,
      offsets.const_data_ptr<int64_t>(), N, R, V, needed, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (M > 0 && R > 0) {  // else no row is needed (and a grid of 0 blocks is a launch error)
    float* lsep = lse.data_ptr<float>();
    int64_t* amp = amax.data_ptr<int64_t>();
    switch (variant) {
      case 1:
        row_stats_kernel<T><<<R, THREADS, 0, stream>>>(lp, logits.stride(0), V, needed, lsep, amp,
                                                       flags + FLAG_BAD_ROW,
                                                       flags + FLAG_BAD_ROW_ID);
        break;
      case 2:
        launch_row_stats_v2<T, 4, THREADS>(logits, needed, lsep, amp, flags, stream);
        break;
      case 4:
        launch_row_stats_v2<T, 8, THREADS>(logits, needed, lsep, amp, flags, stream);
        break;
      default:  // 3, the default; bindings.cpp lets only 1-4 through
        launch_row_stats_v2<T, 4, 32>(logits, needed, lsep, amp, flags, stream);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (N > 0) {
    finish_kernel<T><<<(N + 255) / 256, 256, 0, stream>>>(
        lp, logits.stride(0), row_index.const_data_ptr<int64_t>(),
        target.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
        lse.const_data_ptr<float>(), amax.const_data_ptr<int64_t>(), N, flags + FLAG_ARGS,
        loglik.data_ptr<float>(), greedy.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

// Nothing in this file throws on bad data: a C++ exception thrown from this nvcc-compiled
// translation unit crashed the process (segfault) on the H100 machine (torch 2.11+cu130), so
// the argument and bad-row errors are raised in bindings.cpp (compiled by the host compiler)
// from the flags returned here.
std::tuple<at::Tensor, at::Tensor> gather_logprobs_cuda(const at::Tensor& logits,
                                                        const at::Tensor& row_index,
                                                        const at::Tensor& target,
                                                        const at::Tensor& request_offsets,
                                                        int variant, GatherCudaFlags* flags_out) {
  *flags_out = GatherCudaFlags{};
  const c10::cuda::CUDAGuard guard(logits.device());
  auto ri = row_index.contiguous();
  auto tg = target.contiguous();
  auto off = request_offsets.contiguous();
  const int64_t R = logits.size(0);
  const int64_t N = off.numel() - 1;
  // The row map and the flags share one zero-filled buffer (one fill kernel per call); the
  // flags start at a 16-byte boundary.
  const int64_t flags_at = (R + 15) / 16 * 16;
  auto work = at::zeros({flags_at + NUM_FLAGS * (int64_t)sizeof(int)},
                        logits.options().dtype(at::kByte));
  unsigned char* needed = work.data_ptr<unsigned char>();
  int* flags = reinterpret_cast<int*>(needed + flags_at);
  auto lse = at::empty({R}, logits.options().dtype(at::kFloat));
  auto amax = at::empty({R}, logits.options().dtype(at::kLong));
  auto loglik = at::empty({N}, logits.options().dtype(at::kFloat));
  auto greedy = at::empty({N}, logits.options().dtype(at::kBool));
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch<float>(logits, ri, tg, off, variant, needed, flags, lse, amax, loglik, greedy);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(logits, ri, tg, off, variant, needed, flags, lse, amax, loglik, greedy);
      break;
    case at::kHalf:
      launch<__half>(logits, ri, tg, off, variant, needed, flags, lse, amax, loglik, greedy);
      break;
    default:  // unreachable: bindings.cpp checks the dtype
      flags_out->args = -1;
      return {loglik, greedy};
  }
  // The call's only device sync: one 16-byte read back, after every launch.
  auto f = work.narrow(0, flags_at, NUM_FLAGS * (int64_t)sizeof(int)).cpu();
  const int* fp = reinterpret_cast<const int*>(f.const_data_ptr<unsigned char>());
  flags_out->args = fp[FLAG_ARGS];
  flags_out->bad_row = fp[FLAG_BAD_ROW] != 0 ? fp[FLAG_BAD_ROW_ID] : -1;
  return {loglik, greedy};
}
