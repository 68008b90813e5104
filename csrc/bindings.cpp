// pybind11 bindings of wmdp_fast._C. Argument checking with readable messages happens in
// wmdp_fast/ops.py; the checks here and in the kernels are the last line of defence, so that a
// direct call of wmdp_fast._C raises instead of reading or writing outside the tensors:
// - here, for every device: tensor kinds, dtypes, dimensions, devices and sizes (ValueError);
// - in gather_logprobs_cpu.cpp: every row, target and offset value (range, monotonicity);
// - on CUDA the VALUES are NOT checked (that would cost a device-to-host sync per call, and a
//   throw from the nvcc-compiled file crashed the process): wmdp_fast.ops.gather_logprobs checks
//   them with one sync before it calls _C; a direct CUDA call with out-of-range values is
//   undefined behaviour (an illegal memory access, or garbage).
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

void check_index_tensor(const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(t.defined(), "gather_logprobs: ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.scalar_type() == at::kLong, "gather_logprobs: ", name,
                    " must be a 1-D int64 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == logits.device(), "gather_logprobs: ", name, " is on ",
                    t.device(), " but logits is on ", logits.device());
}

void check_gather_args(const at::Tensor& logits, const at::Tensor& row_index,
                       const at::Tensor& target, const at::Tensor& request_offsets) {
  TORCH_CHECK_VALUE(logits.defined(), "gather_logprobs: logits is an undefined tensor");
  const auto st = logits.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                    "gather_logprobs: logits dtype must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(logits.dim() == 2, "gather_logprobs: logits must be a 2-D tensor [R, V], got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || logits.size(1) <= 1,
                    "gather_logprobs: logits must have a contiguous last dimension (stride(1) == "
                    "1), got strides ",
                    logits.strides());
  check_index_tensor("row_index", row_index, logits);
  check_index_tensor("target", target, logits);
  check_index_tensor("request_offsets", request_offsets, logits);
  TORCH_CHECK_VALUE(row_index.numel() == target.numel(), "gather_logprobs: row_index (",
                    row_index.numel(), ") and target (", target.numel(),
                    ") must have the same length M");
  TORCH_CHECK_VALUE(request_offsets.numel() >= 1,
                    "gather_logprobs: request_offsets must hold N+1 >= 1 entries");
}

std::tuple<at::Tensor, at::Tensor> gather_logprobs(const at::Tensor& logits, const at::Tensor& row_index,
                                                   const at::Tensor& target,
                                                   const at::Tensor& request_offsets) {
  check_gather_args(logits, row_index, target, request_offsets);
  if (logits.is_cuda()) {
#ifdef WMDP_FAST_WITH_CUDA
    TORCH_CHECK_VALUE(logits.size(0) < INT32_MAX, "gather_logprobs (CUDA): at most 2^31-1 rows");
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
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "gather_logprobs: logits on ", logits.device(),
                    " are not supported by wmdp_fast._C (CPU, or CUDA when built with it)");
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
