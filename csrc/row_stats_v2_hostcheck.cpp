// Host check of row_stats variants 2-4 (csrc/row_stats_v2.cuh, unchanged) without a GPU.
//
// Runs every thread of a row in turn, merges their Stats in the order of the kernel's
// __shfl_down tree (and, for a block per row, the second tree over the warps), and compares the
// log-sum-exp, the first argmax and the bad-row verdict with a float64 reference, over row
// lengths around the vector, chunk and block sizes and the real vocabularies (32000 ... 151936),
// every start misalignment, ties at chosen distances, and rows holding NaN, +inf or -inf. What it cannot check is device-only: the
// ex2.approx / max.NaN instructions and the real shuffles (the gpu tests in
// tests/test_ops_gather.py do).
//
// Built and run by tests/test_ops_gather.py (g++ -std=c++17 -O1 -I csrc -I <cuda>/include);
// prints "checked N rows, F failures" and exits non-zero on a failure. Add
// -fsanitize=address,undefined to also check that no thread reads outside its row.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "row_stats_v2.cuh"

using wmdp_v2::Stat;

namespace {

Stat shfl_tree(std::vector<Stat> lanes) {  // lane 0 after the kernel's shfl_down loop
  for (int off = 16; off > 0; off >>= 1) {
    std::vector<Stat> next(32);
    for (int l = 0; l < 32; ++l) next[l] = wmdp_v2::merge(lanes[l], lanes[l + off < 32 ? l + off : l]);
    lanes = next;
  }
  return lanes[0];
}

template <typename T, int U, int G>
bool run_row(const T* src, int64_t V, float* lse, int64_t* amax) {
  std::vector<Stat> th(G);
  for (int t = 0; t < G; ++t) th[t] = wmdp_v2::thread_stat<T, U, G>(src, V, t);
  std::vector<Stat> lanes(32, Stat{-INFINITY, 0.0f, -1});
  for (int w = 0; w < G / 32; ++w)
    lanes[w] = shfl_tree(std::vector<Stat>(th.begin() + 32 * w, th.begin() + 32 * (w + 1)));
  const Stat st = G == 32 ? lanes[0] : shfl_tree(lanes);
  *amax = st.a;
  return wmdp_v2::finish(st, lse);
}

template <typename T>
T from_float(float x);
template <>
float from_float<float>(float x) { return x; }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__half from_float<__half>(float x) { return __float2half(x); }

long n_checked = 0, n_failed = 0;

template <typename T, int U, int G>
void check(const std::vector<float>& vals, int mis, const char* what) {
  const int64_t V = vals.size();
  // exactly the row's bytes after a 16-byte aligned start, so that -fsanitize=address flags any
  // read past the end of the row
  const std::unique_ptr<unsigned char, decltype(&std::free)> mem(
      static_cast<unsigned char*>(std::malloc((mis + V) * sizeof(T))), &std::free);
  if (reinterpret_cast<uintptr_t>(mem.get()) % 16 != 0) {
    std::printf("malloc returned a pointer that is not 16-byte aligned\n");
    std::exit(2);
  }
  T* src = reinterpret_cast<T*>(mem.get() + mis * sizeof(T));
  for (int64_t i = 0; i < V; ++i) src[i] = from_float<T>(vals[i]);
  bool bad = false, any_above_ninf = false;
  double m = -INFINITY;
  int64_t am = -1;
  for (int64_t i = 0; i < V; ++i) {
    const float x = wmdp_v2::tofloat<T>(src[i]);
    bad = bad || std::isnan(x) || x == INFINITY;
    any_above_ninf = any_above_ninf || x != -INFINITY;
    if (!std::isnan(x) && x > m) m = x, am = i;  // strict: the first index of the max
  }
  bad = bad || !any_above_ninf;
  double s = 0.0;
  for (int64_t i = 0; i < V && !bad; ++i) s += std::exp(double(wmdp_v2::tofloat<T>(src[i])) - m);
  const double ref = m + std::log(s);
  float lse;
  int64_t a;
  const bool ok = run_row<T, U, G>(src, V, &lse, &a);
  ++n_checked;
  const bool fail = ok == bad || (ok && (a != am || std::fabs(lse - ref) > 1e-5 + 2e-6 * std::fabs(ref)));
  if (fail && ++n_failed <= 20)
    std::printf("FAIL %s: itemsize %zu U=%d G=%d V=%ld misaligned by %d: good=%d (expected %d) "
                "argmax %ld (expected %ld) lse %.8g (expected %.8g)\n",
                what, sizeof(T), U, G, long(V), mis, ok, !bad, long(a), long(am), lse, ref);
}

template <typename T, int U, int G>
void suite(std::mt19937& rng) {
  constexpr int NV = 16 / sizeof(T);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = INFINITY;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int64_t V : {1, 3, 8, 9, 17, 255, 257, 2049, 8193, 32001}) {
    std::uniform_int_distribution<int64_t> pos(0, V - 1);
    for (int mis = 0; mis < NV; ++mis) {
      std::vector<float> x(V);
      for (auto& v : x) v = normal(rng);
      const std::vector<float> ninf(V, -inf);
      auto with = [&](std::vector<float> y, std::initializer_list<std::pair<int64_t, float>> set) {
        for (auto [i, v] : set)
          if (i >= 0 && i < V) y[i] = v;
        return y;
      };
      check<T, U, G>(x, mis, "random");
      check<T, U, G>(with(x, {{pos(rng), 50.f}, {pos(rng), 50.f}, {pos(rng), 50.f}}), mis, "3 ties");
      // ties one element, one vector, one thread's chunk slot and one whole chunk apart
      const int64_t i0 = pos(rng);
      for (int64_t d : {int64_t(1), int64_t(NV), int64_t(G) * NV, int64_t(G) * NV * U}) {
        check<T, U, G>(with(x, {{i0, 40.f}, {i0 + d, 40.f}}), mis, "tie ahead");
        check<T, U, G>(with(x, {{i0, 40.f}, {i0 - d, 40.f}}), mis, "tie behind");
      }
      check<T, U, G>(with(x, {{0, 60.f}, {V - 1, 60.f}}), mis, "ties at both ends");
      check<T, U, G>(std::vector<float>(V, 1.0f), mis, "all equal");
      check<T, U, G>(with(x, {{pos(rng), 1e4f}}), mis, "one huge logit");
      for (int64_t i : {pos(rng), int64_t(0), V - 1}) {
        check<T, U, G>(with(x, {{i, nan}}), mis, "NaN");
        check<T, U, G>(with(x, {{i, inf}}), mis, "+inf");
      }
      check<T, U, G>(with(x, {{pos(rng), inf}, {pos(rng), -inf}}), mis, "+inf and -inf");
      check<T, U, G>(ninf, mis, "all -inf");
      check<T, U, G>(with(ninf, {{pos(rng), nan}}), mis, "-inf but one NaN");
      check<T, U, G>(with(ninf, {{pos(rng), inf}}), mis, "-inf but one +inf");
      check<T, U, G>(with(ninf, {{pos(rng), 2.f}}), mis, "-inf but one finite");
      check<T, U, G>(with(ninf, {{V - 1, -3.f}}), mis, "-inf but the last");
      check<T, U, G>(with(ninf, {{pos(rng), 2.f}, {pos(rng), nan}}), mis, "-inf, a finite, a NaN");
      std::vector<float> masked = x;
      for (int64_t i = 0; i < 3 * V / 4; ++i) masked[i] = -inf;
      check<T, U, G>(masked, mis, "first 3/4 -inf");
      check<T, U, G>(with(masked, {{V - 1, nan}}), mis, "first 3/4 -inf, NaN last");
    }
  }
  // the real vocabularies (Llama/Mistral 32000, an odd 32001, GPT-2 50257, Qwen 151936): their
  // tails and partial chunks at every misalignment, fewer cases (a row is up to 20x longer)
  for (int64_t V : {32000, 32001, 50257, 151936}) {
    std::uniform_int_distribution<int64_t> pos(0, V - 1);
    for (int mis = 0; mis < NV; ++mis) {
      std::vector<float> x(V);
      for (auto& v : x) v = normal(rng);
      check<T, U, G>(x, mis, "random, real V");
      std::vector<float> y = x;
      y[0] = y[V - 1] = 60.f;
      check<T, U, G>(y, mis, "ties at both ends, real V");
      y = x;
      y[V - 1] = 60.f;
      y[V - 1 - int64_t(G) * NV * U] = 60.f;
      check<T, U, G>(y, mis, "tie a chunk before the last element, real V");
      y = x;
      y[V - 1] = nan;
      check<T, U, G>(y, mis, "NaN last, real V");
      y = x;
      y[pos(rng)] = inf;
      check<T, U, G>(y, mis, "+inf, real V");
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  suite<float, 4, 256>(rng);  // variant 2
  suite<float, 4, 32>(rng);   // variant 3
  suite<float, 8, 256>(rng);  // variant 4
  suite<__nv_bfloat16, 4, 256>(rng);
  suite<__nv_bfloat16, 4, 32>(rng);
  suite<__nv_bfloat16, 8, 256>(rng);
  suite<__half, 4, 256>(rng);
  suite<__half, 4, 32>(rng);
  suite<__half, 8, 256>(rng);
  std::printf("checked %ld rows, %ld failures\n", n_checked, n_failed);
  return n_failed != 0;
}
