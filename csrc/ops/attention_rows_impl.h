#pragma once

// Private to the op: the device-independent half of attention_rows and the hook each
// device's kernel fills in.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sdrpn::ops {

void check_attention_rows_inputs(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& query_positions, const at::Tensor& key_start,
                                 int64_t key_length,
                                 const std::optional<at::Tensor>& key_padding_mask,
                                 std::optional<double> scale);

// The device-specific half of the op: for float32 scores (B, Hc, Q, L) (already scaled),
// the masked softmax of every row, written only on each sample's key window into
// `out` (B, Hc, Q, key_length), which may be a strided view.
using WindowSoftmaxFn = void (*)(const at::Tensor& scores, const at::Tensor& query_positions,
                                 const at::Tensor& key_start,
                                 const std::optional<at::Tensor>& key_padding_mask,
                                 at::Tensor& out);

// The CPU implementation of WindowSoftmaxFn, declared here so that tests can drive
// attention_rows_by_chunks with a chunk budget of their own.
void window_softmax_cpu(const at::Tensor& scores, const at::Tensor& query_positions,
                        const at::Tensor& key_start,
                        const std::optional<at::Tensor>& key_padding_mask, at::Tensor& out);

// Float32 elements one chunk of heads may hold in its score buffer (64 Mi).
constexpr int64_t kAttentionRowsScoreBudget = int64_t{1} << 26;

// The device-independent half: validates, then walks the key heads in chunks whose
// float32 score buffer stays within `score_budget` elements (at least one key head a
// chunk), computing scores with one batched GEMM per chunk (ATen: cuBLAS on CUDA) and
// handing them to `window_softmax`.
at::Tensor attention_rows_by_chunks(const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& query_positions, const at::Tensor& key_start,
                                    int64_t key_length,
                                    const std::optional<at::Tensor>& key_padding_mask,
                                    std::optional<double> scale, WindowSoftmaxFn window_softmax,
                                    int64_t score_budget = kAttentionRowsScoreBudget);

}  // namespace sdrpn::ops
