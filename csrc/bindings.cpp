// pybind11 bindings of wmdp_fast._C. Argument checking with readable messages happens in
// wmdp_fast/ops.py; the checks here and in the kernels are the last line of defence, so that a
// direct call of wmdp_fast._C raises instead of reading or writing outside the tensors:
// - here, for every device: tensor kinds, dtypes, dimensions, devices and sizes (ValueError);
// - in gather_logprobs_cpu.cpp: every row, target and offset value (range, monotonicity);
// - on CUDA, every value is checked by the kernels as they run (a bad one is never used as an
//   address) and read back with the bad-row flags after the launch, the call's only device sync;
//   check_gather_values then raises the same ValueError wmdp_fast.ops raises on the CPU (a
//   throw from the nvcc-compiled file crashed the process, so it is raised here).
#include <torch/extension.h>

#include <cstdlib>
#include <string>

#include "gather_logprobs.h"

namespace {
// Which row_stats kernel the CUDA path runs (gather_logprobs_cuda.cu describes them): read from
// the environment on every call, so a benchmark or test can switch it without reloading _C.
int gather_cuda_variant() {
  const char* env = std::getenv("WMDP_FAST_GATHER_CUDA_VARIANT");
  if (env == nullptr || env[0] == '\0') return 3;
  const std::string v(env);
  TORCH_CHECK(v == "1" || v == "2" || v == "3" || v == "4",
              "WMDP_FAST_GATHER_CUDA_VARIANT must be 1, 2, 3 (the default) or 4, got '", v,
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

// The value checks of wmdp_fast.ops, in its order and with its messages (first/last offset,
// monotonicity, row range, target range), as ATen ops on the tensors' device: the error path of
// a CUDA call whose kernels flagged an argument (the syncs of .item() are paid only there).
// Bound as check_gather_values, so the CPU tests compare these messages with ops'.
void check_gather_values(const at::Tensor& logits, const at::Tensor& row_index,
                         const at::Tensor& target, const at::Tensor& off) {
  check_gather_args(logits, row_index, target, off);
  const int64_t R = logits.size(0), V = logits.size(1), M = row_index.numel();
  const int64_t first = off[0].item<int64_t>(), last = off[-1].item<int64_t>();
  TORCH_CHECK_VALUE(first == 0 && last == M, "gather_logprobs: request_offsets must start at 0 ",
                    "and end at M=", M, ", got ", first, "..", last);
  if (off.numel() > 1) {
    auto dec = (off.slice(0, 1) < off.slice(0, 0, -1)).nonzero();
    if (dec.size(0) > 0) {
      const int64_t i = dec[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "gather_logprobs: request_offsets must be non-decreasing (entry ",
                        i + 1, " < entry ", i, ")");
    }
  }
  if (M > 0) {
    const int64_t rlo = row_index.min().item<int64_t>(), rhi = row_index.max().item<int64_t>();
    TORCH_CHECK_VALUE(rlo >= 0 && rhi < R, "gather_logprobs: row_index out of range [0, ", R,
                      "): min ", rlo, ", max ", rhi);
    const int64_t tlo = target.min().item<int64_t>(), thi = target.max().item<int64_t>();
    TORCH_CHECK_VALUE(tlo >= 0 && thi < V, "gather_logprobs: target id out of range [0, ", V,
                      "): min ", tlo, ", max ", thi);
  }
}

std::tuple<at::Tensor, at::Tensor> gather_logprobs(const at::Tensor& logits, const at::Tensor& row_index,
                                                   const at::Tensor& target,
                                                   const at::Tensor& request_offsets) {
  check_gather_args(logits, row_index, target, request_offsets);
  if (logits.is_cuda()) {
#ifdef WMDP_FAST_WITH_CUDA
    TORCH_CHECK_VALUE(logits.size(0) < INT32_MAX, "gather_logprobs (CUDA): at most 2^31-1 rows");
    const int variant = gather_cuda_variant();
    GatherCudaFlags flags;
    auto out = gather_logprobs_cuda(logits, row_index, target, request_offsets, variant, &flags);
    if (flags.args != 0) {
      check_gather_values(logits, row_index, target, request_offsets);
      TORCH_CHECK(false, "gather_logprobs (CUDA): the kernels flagged invalid arguments (bits ",
                  flags.args, ") that a recheck does not find; please report this with the inputs");
    }
    const int64_t bad_row = flags.bad_row;
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
  m.def("check_gather_values", &check_gather_values,
        "the ValueError the CUDA path raises for bad row / target / offset values (any device; "
        "syncs: it is the error path)",
        pybind11::arg("logits"), pybind11::arg("row_index"), pybind11::arg("target"),
        pybind11::arg("request_offsets"));
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("gather_cuda_variant", &gather_cuda_variant,
        "the row_stats kernel variant (1-4, default 3) WMDP_FAST_GATHER_CUDA_VARIANT selects "
        "for CUDA logits");
}
