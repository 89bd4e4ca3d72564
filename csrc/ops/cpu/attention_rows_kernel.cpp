#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../attention_rows_impl.h"
#include "sdrpn/attention_rows_math.h"

namespace sdrpn::ops {

void window_softmax_cpu(const at::Tensor& scores, const at::Tensor& query_positions,
                        const at::Tensor& key_start,
                        const std::optional<at::Tensor>& key_padding_mask, at::Tensor& out) {
  const int64_t heads = scores.size(1), rows = scores.size(2), seq_len = scores.size(3);
  const int64_t key_length = out.size(3);
  const auto positions = query_positions.accessor<int64_t, 2>();
  const auto starts = key_start.accessor<int64_t, 1>();
  const auto mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  const bool* mask_data = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const float* score_data = scores.const_data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const auto out_strides = out.strides();

  at::parallel_for(0, scores.size(0) * heads * rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (heads * rows), h = (row / rows) % heads, q = row % rows;
      const float* s = score_data + row * seq_len;
      const bool* real = mask_data ? mask_data + b * seq_len : nullptr;
      const int64_t position = positions[b][q];
      auto visible = [&](int64_t j) { return math::key_visible(j, position, !real || real[j]); };

      float row_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < seq_len; ++j) {
        if (visible(j)) row_max = std::max(row_max, s[j]);
      }
      float row_sum = 0.0f;
      for (int64_t j = 0; j < seq_len; ++j) {
        if (visible(j)) row_sum += math::shifted_exp(s[j], row_max);
      }
      float* o = out_data + b * out_strides[0] + h * out_strides[1] + q * out_strides[2];
      const int64_t start = starts[b];
      for (int64_t c = 0; c < key_length; ++c) {
        o[c * out_strides[3]] =
            math::window_probability(s[start + c], visible(start + c), row_max, row_sum);
      }
    }
  });
}

namespace {

at::Tensor attention_rows_kernel(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& query_positions, const at::Tensor& key_start,
                                 int64_t key_length,
                                 const std::optional<at::Tensor>& key_padding_mask,
                                 std::optional<double> scale) {
  return attention_rows_by_chunks(query, key, query_positions, key_start, key_length,
                                  key_padding_mask, scale, &window_softmax_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CPU, m) { m.impl("attention_rows", &attention_rows_kernel); }

}  // namespace sdrpn::ops
