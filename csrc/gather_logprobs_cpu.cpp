// CPU kernel of gather_logprobs: one streaming pass over each needed row.
//
// Each row is read in chunks of CHUNK elements that are converted to float32 in a small
// stack buffer (so bf16/fp16 are read directly and no [R, V] float32 copy exists). Per chunk:
// max, first argmax, NaN/+inf detection, and sum(exp(x - running_max)) with an online
// rescale (the usual streaming log-sum-exp). The exp is a polynomial the compiler vectorises;
// gcc builds an x86-64-v3 clone (AVX2 and FMA together) and a baseline clone and picks one at
// load time. (target_clones("avx2,fma", ...) would make SEPARATE avx2-only and fma-only clones:
// each comma-separated option is its own clone.)
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "gather_logprobs.h"

namespace {

constexpr int64_t CHUNK = 2048;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define WMDP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// gcc < 12 does not take x86-64-v3 here; haswell is the same AVX2 + FMA level
#define WMDP_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define WMDP_CLONES
#endif

// GCC/clang vector extensions: 8 float lanes, one AVX2 register or two SSE registers; plain
// auto-vectorisation failed here on the float->int bit trick of the exp.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// sum(exp(x[i] - m)) for x[i] <= m. exp is Cephes-style (about 2 ulp): x = n ln2 + r and a
// degree-6 polynomial; arguments below -87 flush to exp(-87) ~ 1.6e-38, which changes nothing
// in a sum that holds at least exp(0) = 1. (-inf inputs land there too.)
WMDP_CLONES
float sum_exp_shifted(const float* __restrict x, int64_t n, float m) {
  v8f acc = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v;
    std::memcpy(&v, x + i, sizeof(v));
    v = v - m;
    v = v < -87.0f ? (v8f){} - 87.0f : v;
    const v8f kn = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    v8f r = v - kn * 0.693359375f;
    r = r + kn * 2.12194440e-4f;
    v8f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i e = (__builtin_convertvector(kn, v8i) + 127) << 23;  // 2^kn as float bits
    acc += p * (v8f)e;
  }
  float s = 0.0f;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; i < n; ++i) s += std::exp(x[i] - m);
  return s;
}

// max of x[0..n); sets *bad if any element is NaN or +inf.
WMDP_CLONES
float chunk_max(const float* __restrict x, int64_t n, bool* bad) {
  const float ninf = -std::numeric_limits<float>::infinity();
  v8f mx = (v8f){} + ninf;
  v8i nf = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v;
    std::memcpy(&v, x + i, sizeof(v));
    mx = v > mx ? v : mx;
    // NaN and +inf are the values with v - v != 0 other than -inf.
    nf |= (v - v != 0.0f) & (v != ninf);
  }
  float m = ninf;
  int bad_any = 0;
  for (int l = 0; l < 8; ++l) {
    m = mx[l] > m ? mx[l] : m;
    bad_any |= nf[l];
  }
  for (; i < n; ++i) {
    const float v = x[i];
    m = v > m ? v : m;
    bad_any |= !(v - v == 0.0f) && v != ninf;
  }
  *bad = *bad || bad_any;
  return m;
}

// bfloat16 -> float32 is a 16-bit shift of the bits.
WMDP_CLONES
void bf16_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &b, sizeof(b));
  }
}

// float16 -> float32: c10's branchless bit conversion, vectorised inside the clones.
WMDP_CLONES
void f16_to_float(const at::Half* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void row_stats_impl(const at::Tensor& logits, const int64_t* rows, int64_t U, float* lse,
                    int64_t* amax) {
  const int64_t V = logits.size(1);
  const int64_t rs = logits.stride(0);
  const T* base = logits.const_data_ptr<T>();
  // Large rows: a few rows already saturate the cores; grain 1 keeps both busy.
  at::parallel_for(0, U, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[CHUNK];
    for (int64_t u = begin; u < end; ++u) {
      const T* src = base + rows[u] * rs;
      double s = 0.0;  // across-chunk accumulation in double: V up to ~10^6 terms
      float m = -std::numeric_limits<float>::infinity();
      int64_t arg = -1;
      bool bad = false;
      for (int64_t c = 0; c < V; c += CHUNK) {
        const int64_t n = std::min(CHUNK, V - c);
        const float* x;
        if constexpr (std::is_same_v<T, float>) {
          x = src + c;
        } else if constexpr (std::is_same_v<T, at::BFloat16>) {
          bf16_to_float(reinterpret_cast<const uint16_t*>(src + c), buf, n);
          x = buf;
        } else {
          static_assert(std::is_same_v<T, at::Half>);
          f16_to_float(src + c, buf, n);
          x = buf;
        }
        const float cm = chunk_max(x, n, &bad);
        if (bad) break;
        if (cm > m) {
          int64_t j = 0;
          while (x[j] != cm) ++j;  // first index of the maximum (torch.argmax's rule)
          arg = c + j;
          s = s * std::exp(static_cast<double>(m) - static_cast<double>(cm));
          m = cm;
        }
        if (m != -std::numeric_limits<float>::infinity()) s += sum_exp_shifted(x, n, m);
      }
      if (bad || arg < 0) {
        lse[u] = std::numeric_limits<float>::quiet_NaN();
        amax[u] = -1;
      } else {
        lse[u] = m + static_cast<float>(std::log(s));
        amax[u] = arg;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> row_stats_cpu(const at::Tensor& logits, const at::Tensor& rows) {
  TORCH_CHECK_VALUE(logits.device().is_cpu() && rows.device().is_cpu(),
                    "row_stats_cpu: logits and rows must be CPU tensors");
  TORCH_CHECK_VALUE(logits.dim() == 2 && (logits.stride(1) == 1 || logits.size(1) <= 1),
                    "row_stats_cpu: logits must be [R, V] with V contiguous, got ", logits.sizes(),
                    " with strides ", logits.strides());
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.scalar_type() == at::kLong,
                    "row_stats_cpu: rows must be a 1-D int64 tensor, got ", rows.scalar_type(), " ",
                    rows.sizes());
  auto rows_c = rows.contiguous();
  const int64_t U = rows_c.numel();
  const int64_t R = logits.size(0);
  for (int64_t u = 0; u < U; ++u) {
    const int64_t r = rows_c.const_data_ptr<int64_t>()[u];
    TORCH_CHECK_VALUE(r >= 0 && r < R, "row_stats_cpu: rows[", u, "] = ", r, " is out of range [0, ",
                      R, ")");
  }
  auto lse = at::empty({U}, logits.options().dtype(at::kFloat));
  auto amax = at::empty({U}, logits.options().dtype(at::kLong));
  const int64_t* r = rows_c.const_data_ptr<int64_t>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      row_stats_impl<float>(logits, r, U, lse.data_ptr<float>(), amax.data_ptr<int64_t>());
      break;
    case at::kBFloat16:
      row_stats_impl<at::BFloat16>(logits, r, U, lse.data_ptr<float>(), amax.data_ptr<int64_t>());
      break;
    case at::kHalf:
      row_stats_impl<at::Half>(logits, r, U, lse.data_ptr<float>(), amax.data_ptr<int64_t>());
      break;
    default:
      TORCH_CHECK(false, "logits dtype must be float32, bfloat16 or float16, got ", logits.scalar_type());
  }
  return {lse, amax};
}

namespace {
template <typename T>
float read_as_float(const at::Tensor& logits, int64_t row, int64_t col) {
  return static_cast<float>(logits.const_data_ptr<T>()[row * logits.stride(0) + col]);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_logprobs_cpu(const at::Tensor& logits,
                                                       const at::Tensor& row_index,
                                                       const at::Tensor& target,
                                                       const at::Tensor& request_offsets) {
  // bindings.cpp has checked devices, dtypes and shapes; the values are checked here, in the
  // loops over M and N+1 that read them anyway (an out-of-range value would read or write
  // outside the tensors).
  TORCH_CHECK(logits.device().is_cpu(), "gather_logprobs_cpu: logits must be on the CPU");
  const int64_t R = logits.size(0);
  const int64_t V = logits.size(1);
  const int64_t M = row_index.numel();
  const int64_t N = request_offsets.numel() - 1;
  auto ri = row_index.contiguous();
  auto tg = target.contiguous();
  auto off = request_offsets.contiguous();
  const int64_t* rip = ri.const_data_ptr<int64_t>();
  const int64_t* tgp = tg.const_data_ptr<int64_t>();
  const int64_t* offp = off.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(offp[0] == 0 && offp[N] == M, "gather_logprobs: request_offsets must start at 0 ",
                    "and end at M=", M, ", got ", offp[0], "..", offp[N]);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(offp[n + 1] >= offp[n], "gather_logprobs: request_offsets must be ",
                      "non-decreasing (entry ", n + 1, " < entry ", n, ")");
  }

  // Distinct rows, each computed once: slot[r] = position of row r in `rows`, or -1.
  std::vector<int64_t> slot(R, -1);
  std::vector<int64_t> rows;
  rows.reserve(M);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t r = rip[i], t = tgp[i];
    TORCH_CHECK_VALUE(r >= 0 && r < R, "gather_logprobs: row_index[", i, "] = ", r,
                      " is out of range [0, ", R, ")");
    TORCH_CHECK_VALUE(t >= 0 && t < V, "gather_logprobs: target[", i, "] = ", t,
                      " is out of range [0, ", V, ")");
    if (slot[r] < 0) {
      slot[r] = static_cast<int64_t>(rows.size());
      rows.push_back(r);
    }
  }
  auto rows_t = at::from_blob(rows.data(), {static_cast<int64_t>(rows.size())}, at::kLong);
  auto [lse, amax] = row_stats_cpu(logits, rows_t);
  const float* lsep = lse.const_data_ptr<float>();
  const int64_t* amp = amax.const_data_ptr<int64_t>();
  // The smallest bad row id is named, whatever the order of row_index (as the CUDA path does).
  int64_t bad_row = -1;
  for (size_t u = 0; u < rows.size(); ++u) {
    if (std::isnan(lsep[u]) && (bad_row < 0 || rows[u] < bad_row)) bad_row = rows[u];
  }
  TORCH_CHECK(bad_row < 0, "logits row ", bad_row,
              " contains NaN or +inf, or is entirely -inf: its log-softmax is undefined");

  auto loglik = at::empty({N}, logits.options().dtype(at::kFloat));
  auto greedy = at::empty({N}, logits.options().dtype(at::kBool));
  float* llp = loglik.data_ptr<float>();
  bool* gp = greedy.data_ptr<bool>();
  const auto st = logits.scalar_type();
  for (int64_t n = 0; n < N; ++n) {
    double acc = 0.0;  // summed in order: deterministic
    bool g = true;
    for (int64_t i = offp[n]; i < offp[n + 1]; ++i) {
      const int64_t u = slot[rip[i]];
      float x;
      if (st == at::kFloat) {
        x = read_as_float<float>(logits, rip[i], tgp[i]);
      } else if (st == at::kBFloat16) {
        x = read_as_float<at::BFloat16>(logits, rip[i], tgp[i]);
      } else {
        x = read_as_float<at::Half>(logits, rip[i], tgp[i]);
      }
      acc += static_cast<double>(x - lsep[u]);
      g = g && (amp[u] == tgp[i]);
    }
    llp[n] = static_cast<float>(acc);
    gp[n] = g;
  }
  return {loglik, greedy};
}
