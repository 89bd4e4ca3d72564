#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sdrpn {

// Softmax attention rows of selected queries, kept only on a window of key columns.
//   query: (B, H, Q, d) post-RoPE queries of the wanted rows; key: (B, Hk, L, d), Hk divides H
//   (grouped-query attention); float32/float64/float16/bfloat16, one dtype.
//   query_positions: (B, Q) int64 sequence position of each query: key j is visible to it
//   iff j <= position and key_padding_mask[b, j] (True = real token).
//   key_start: (B,) int64 first kept column per sample; key_length: kept columns.
//   scale: defaults to 1/sqrt(d); finite, and within float32's range for inputs other
//   than float64.
// Returns float32 (B, H, Q, key_length): the softmax over ALL visible keys, restricted to
// columns key_start .. key_start + key_length - 1 (no renormalisation); 0 where not visible.
at::Tensor attention_rows(const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& query_positions, const at::Tensor& key_start,
                          int64_t key_length,
                          const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                          std::optional<double> scale = std::nullopt);

}  // namespace sdrpn
