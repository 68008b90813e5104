// Batched MCQ log-prob gathering: shared declarations of the CPU and CUDA paths.
#pragma once
#include <torch/extension.h>

#include <tuple>

// Per-row statistics of `logits` rows listed in `rows` (int64 [U], unique):
// log-sum-exp (float32 [U]) and first argmax (int64 [U]), one pass over V.
// A row holding NaN or +inf, or only -inf, gets lse = NaN (the caller reports it).
std::tuple<at::Tensor, at::Tensor> row_stats_cpu(const at::Tensor& logits, const at::Tensor& rows);

// Full op on CPU: loglik float32 [N], is_greedy bool [N]. Checks every row / target / offset
// value (ValueError) and raises a RuntimeError naming the SMALLEST bad row id, whatever the order
// of row_index (the CUDA path names the same row). Shapes and dtypes: checked in bindings.cpp.
std::tuple<at::Tensor, at::Tensor> gather_logprobs_cpu(const at::Tensor& logits,
                                                       const at::Tensor& row_index,
                                                       const at::Tensor& target,
                                                       const at::Tensor& request_offsets);

#ifdef WMDP_FAST_WITH_CUDA
// Bits of GatherCudaFlags::args: which kind of argument value the CUDA path found invalid.
constexpr int GATHER_ARG_ROW_INDEX = 1;  // a row outside [0, R)
constexpr int GATHER_ARG_TARGET = 2;     // a target outside [0, V)
constexpr int GATHER_ARG_OFFSETS = 4;    // offsets not 0 ... M, or decreasing

// What the CUDA path read back after its launches (its only device sync).
struct GatherCudaFlags {
  int args = 0;          // GATHER_ARG_* bits (0: every value valid); -1: internal error
  int64_t bad_row = -1;  // the smallest row holding NaN/+inf or only -inf, else -1
};

// Never throws on data: every row / target / offset value is checked by the kernels (a bad value
// is never used as an address) and reported in *flags with the bad rows; the caller in
// bindings.cpp raises (see the note in gather_logprobs_cuda.cu). The outputs are valid only when
// flags->args == 0 and flags->bad_row < 0. `variant` picks the row_stats kernel (1-4, described
// in gather_logprobs_cuda.cu; the caller checks the range).
std::tuple<at::Tensor, at::Tensor> gather_logprobs_cuda(const at::Tensor& logits,
                                                        const at::Tensor& row_index,
                                                        const at::Tensor& target,
                                                        const at::Tensor& request_offsets,
                                                        int variant, GatherCudaFlags* flags);
#endif
