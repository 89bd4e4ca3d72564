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

// Elements that each buffer of one chunk of heads, its scores and its copy of the keys,
// may hold (16 Mi: 64 MB in float32, the compute type of every input but float64): the op
// runs inside a model's forward (the label pass reduces each probed layer as it runs),
// beside the layer's own activations.
constexpr int64_t kAttentionRowsChunkBudget = int64_t{1} << 24;

// The device-independent half: validates, then walks the key heads in chunks whose
// float32 scores and float32 keys each stay within `chunk_budget` elements (at least one
// key head a chunk), computing scores with one batched GEMM per chunk (ATen: cuBLAS on
// CUDA) and handing them to `window_softmax`.
at::Tensor attention_rows_by_chunks(const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& query_positions, const at::Tensor& key_start,
                                    int64_t key_length,
                                    const std::optional<at::Tensor>& key_padding_mask,
                                    std::optional<double> scale, WindowSoftmaxFn window_softmax,
                                    int64_t chunk_budget = kAttentionRowsChunkBudget);

}  // namespace sdrpn::ops
