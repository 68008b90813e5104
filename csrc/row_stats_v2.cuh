// Per-thread math of the row_stats kernel, variants 2-4 (see gather_logprobs_cuda.cu).
//
// Header-only and __host__ __device__, so that a host program can run exactly this code (the
// thread loop and the merge) without a GPU; the device-only parts (the 16-byte __ldg, the
// max.NaN instruction) have host equivalents below.
//
// Differences from variant 1's fold, same results on good rows:
// - U 16-byte loads are issued before any of them is used (U vectors of one thread are U * G
//   elements apart, so a warp's loads stay coalesced), and the U * NV values fold as one chunk:
//   one max, at most one rescale, one first-index search (only when the running max grows).
// - No per-element NaN/+inf test. The max propagates NaN (max.NaN), so a NaN reaches the sum as
//   exp2(NaN) = NaN even in a chunk whose other values are -inf; +inf becomes the running max and
//   its own term is exp2(inf - inf) = NaN. NaN survives every later rescale and merge (NaN * 0 is
//   NaN), so a row is bad exactly when its log-sum-exp is not finite, or when nothing but -inf
//   was seen (argmax < 0).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define WMDP_HD __host__ __device__ __forceinline__
#else
#define WMDP_HD inline
#endif

namespace wmdp_v2 {

constexpr float LOG2E = 1.4426950408889634f;

struct Stat {
  float m;    // running max (NaN or +inf once such a value was seen)
  float s;    // sum of exp(x - m)
  int64_t a;  // first index of the max (-1: only -inf so far)
};

WMDP_HD float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? NAN : (b > a ? b : a);
#endif
}

WMDP_HD float ex2(float x) {
#ifdef __CUDA_ARCH__
  return exp2f(x);  // ex2.approx.ftz with --use_fast_math, as in variant 1
#else
  return std::exp2(x);
#endif
}

template <typename T>
WMDP_HD float tofloat(T x);
template <>
WMDP_HD float tofloat<float>(float x) { return x; }
template <>
WMDP_HD float tofloat<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
WMDP_HD float tofloat<__half>(__half x) { return __half2float(x); }

// A 16-byte vector of -inf in T: fills the load slots past the end of the row.
template <typename T>
WMDP_HD uint4 neg_inf_vec();
template <>
WMDP_HD uint4 neg_inf_vec<float>() { return make_uint4(0xFF800000u, 0xFF800000u, 0xFF800000u, 0xFF800000u); }
template <>
WMDP_HD uint4 neg_inf_vec<__nv_bfloat16>() { return make_uint4(0xFF80FF80u, 0xFF80FF80u, 0xFF80FF80u, 0xFF80FF80u); }
template <>
WMDP_HD uint4 neg_inf_vec<__half>() { return make_uint4(0xFC00FC00u, 0xFC00FC00u, 0xFC00FC00u, 0xFC00FC00u); }

WMDP_HD uint4 load16(const uint4* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// Fold K values into st. Value i sits at index base + (i / NV) * jstride + i % NV; indices grow
// with i, and a thread's chunks come in increasing index order, so the strict `vm > st.m` keeps
// the FIRST index of the maximum (torch.argmax's rule).
template <int K, int NV>
WMDP_HD void fold(Stat& st, const float (&x)[K], int64_t base, int64_t jstride) {
  float vm = x[0];
#pragma unroll
  for (int i = 1; i < K; ++i) vm = max_nan(vm, x[i]);
  if (vm == -INFINITY) return;  // contributes exp(-inf) = 0 (and -inf - -inf would be NaN)
  if (st.a < 0 || vm > st.m) {
    int64_t idx = base;  // stays when vm is NaN: the row is bad, the index unused
#pragma unroll
    for (int i = K - 1; i >= 0; --i)
      if (x[i] == vm) idx = base + (i / NV) * jstride + i % NV;
    st.s = st.a < 0 ? 0.0f : st.s * ex2((st.m - vm) * LOG2E);
    st.m = vm;
    st.a = idx;
  }
  // (x - m) first: exact for nearby values, so logits of size 1e4 keep their precision
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < K; ++i) acc += ex2((x[i] - st.m) * LOG2E);
  st.s += acc;
}

WMDP_HD Stat merge(Stat a, Stat b) {
  Stat r;
  // max, ties to the smaller index; a NaN max makes both scaled sums NaN whichever is taken
  const bool take_b = (b.a >= 0) && (a.a < 0 || b.m > a.m || (b.m == a.m && b.a < a.a));
  r.m = take_b ? b.m : a.m;
  r.a = take_b ? b.a : a.a;
  const float sa = a.a < 0 ? 0.0f : a.s * ex2((a.m - r.m) * LOG2E);
  const float sb = b.a < 0 ? 0.0f : b.s * ex2((b.m - r.m) * LOG2E);
  r.s = sa + sb;
  return r;
}

// log-sum-exp of a merged row into *lse; false for a bad row (NaN/+inf anywhere, or only -inf).
WMDP_HD bool finish(const Stat& st, float* lse) {
  *lse = st.m + logf(st.s);
  return st.a >= 0 && fabsf(*lse) <= FLT_MAX;
}

// Fold the U vectors vsrc[v], vsrc[v + G], ... (element index head + vector * NV) into st: all U
// loads are issued before any is used. FULL: all U are in range (no bounds test); otherwise the
// vectors at or past nvec read as -inf.
template <typename T, int U, int G, bool FULL>
WMDP_HD void fold_chunk(Stat& st, const uint4* vsrc, int64_t v, int64_t nvec, int64_t head) {
  constexpr int NV = 16 / sizeof(T);
  uint4 raw[U];
#pragma unroll
  for (int j = 0; j < U; ++j)
    raw[j] = (FULL || v + j * G < nvec) ? load16(vsrc + v + j * G) : neg_inf_vec<T>();
  float x[U * NV];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    const T* e = reinterpret_cast<const T*>(&raw[j]);
#pragma unroll
    for (int k = 0; k < NV; ++k) x[j * NV + k] = tofloat<T>(e[k]);
  }
  fold<U * NV, NV>(st, x, head + v * NV, (int64_t)G * NV);
}

// The Stat of thread t (of G threads sharing the row) over src[0, V): a misaligned head element
// by element, then 16-byte vectors v = t, t + G, ... taken U at a time, then the tail.
template <typename T, int U, int G>
WMDP_HD Stat thread_stat(const T* src, int64_t V, int t) {
  constexpr int NV = 16 / sizeof(T);
  Stat st{-INFINITY, 0.0f, -1};
  // Vector loads need a 16-byte aligned start: a misaligned head goes element by element.
  const int64_t mis = (reinterpret_cast<uintptr_t>(src) % 16) / sizeof(T);
  const int64_t head = mis == 0 ? 0 : (V < NV - mis ? V : NV - mis);
  for (int64_t i = t; i < head; i += G) {
    const float x[1] = {tofloat<T>(src[i])};
    fold<1, 1>(st, x, i, 0);
  }
  const int64_t nvec = (V - head) / NV;
  const uint4* vsrc = reinterpret_cast<const uint4*>(src + head);
  int64_t v = t;
  // full chunks: U independent loads in flight, no bounds tests
  for (; v + (U - 1) * G < nvec; v += U * G) fold_chunk<T, U, G, true>(st, vsrc, v, nvec, head);
  // at most one partial chunk: missing vectors read as -inf
  if (v < nvec) fold_chunk<T, U, G, false>(st, vsrc, v, nvec, head);
  for (int64_t i = head + nvec * NV + t; i < V; i += G) {
    const float x[1] = {tofloat<T>(src[i])};
    fold<1, 1>(st, x, i, 0);
  }
  return st;
}

}  // namespace wmdp_v2

#undef WMDP_HD
