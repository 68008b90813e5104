// pybind11 bindings of wmdp_fast._C. Argument checking with readable messages happens in
// wmdp_fast/ops.py; the TORCH_CHECKs in the kernels are the last line of defence.
#include <torch/extension.h>

#include "gather_logprobs.h"

namespace {
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
    int64_t bad_row = -1;
    auto out = gather_logprobs_cuda(logits, row_index, target, request_offsets, &bad_row);
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
}
