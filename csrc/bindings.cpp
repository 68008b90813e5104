// pybind11 bindings of wmdp_fast._C. Argument checking with readable messages happens in
// wmdp_fast/ops.py; the TORCH_CHECKs in the kernels are the last line of defence.
#include <torch/extension.h>

#include <cstdlib>
#include <string>

#include "gather_logprobs.h"

namespace {
// Which row_stats kernel the CUDA path runs (gather_logprobs_cuda.cu describes them): read from
// the environment on every call, so a benchmark or test can switch it without reloading _C.
int gather_cuda_variant() {
  const char* env = std::getenv("WMDP_FAST_GATHER_CUDA_VARIANT");
  if (env == nullptr || env[0] == '\0') return 1;
  const std::string v(env);
  TORCH_CHECK(v == "1" || v == "2" || v == "3" || v == "4",
              "WMDP_FAST_GATHER_CUDA_VARIANT must be 1 (the default), 2, 3 or 4, got '", v,
              "': unset it or pick one of those (csrc/gather_logprobs_cuda.cu describes them)");
  return v[0] - '0';
}

std::tuple<at::Tensor, at::Tensor> gather_logprobs(const at::Tensor& logits, const at::Tensor& row_index,
                                                   const at::Tensor& target,
                                                   const at::Tensor& request_offsets) {
  if (logits.is_cuda()) {
#ifdef WMDP_FAST_WITH_CUDA
    const auto st = logits.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                "logits dtype must be float32, bfloat16 or float16, got ", st);
    TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1,
                "logits must be [R, V] with V contiguous");
    TORCH_CHECK(logits.size(0) < INT32_MAX, "gather_logprobs (CUDA): at most 2^31-1 rows");
    const int variant = gather_cuda_variant();
    int64_t bad_row = -1;
    auto out = gather_logprobs_cuda(logits, row_index, target, request_offsets, variant, &bad_row);
    TORCH_CHECK(bad_row < 0, "logits row ", bad_row,
                " contains NaN or +inf, or is entirely -inf: its log-softmax is undefined");
    return out;
#else
    TORCH_CHECK(false, "wmdp_fast._C was built without CUDA support");
#endif
  }
  return gather_logprobs_cpu(logits, row_index, target, request_offsets);
}

bool with_cuda() {
#ifdef WMDP_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wmdp_fast C++ ops: batched MCQ log-prob gathering";
  m.def("gather_logprobs", &gather_logprobs,
        "loglik float32 [N], is_greedy bool [N] from logits [R, V] (see wmdp_fast.ops)",
        pybind11::arg("logits"), pybind11::arg("row_index"), pybind11::arg("target"),
        pybind11::arg("request_offsets"));
  m.def("row_stats_cpu", &row_stats_cpu, "log-sum-exp and first argmax of the given rows (CPU)");
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("gather_cuda_variant", &gather_cuda_variant,
        "the row_stats kernel variant (1-4) WMDP_FAST_GATHER_CUDA_VARIANT selects for CUDA logits");
}
