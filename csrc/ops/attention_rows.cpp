#include "sdrpn/attention_rows.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention_rows_impl.h"
#include "checks.h"

namespace sdrpn {
namespace ops {

void check_attention_rows_inputs(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& query_positions, const at::Tensor& key_start,
                                 int64_t key_length,
                                 const std::optional<at::Tensor>& key_padding_mask,
                                 std::optional<double> scale) {
  TORCH_CHECK(query.dim() == 4, "query must be (B, H, Q, d), got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 4, "key must be (B, Hk, L, d), got shape ", key.sizes());
  check_floating(query, "query");
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), "key must have the dtype of query (",
              query.scalar_type(), "), got ", key.scalar_type());
  check_same_device(key, "key", query, "query");
  const int64_t batch = query.size(0), heads = query.size(1), rows = query.size(2);
  TORCH_CHECK(key.size(0) == batch, "key must have the batch size of query (", batch, "), got ",
              key.size(0));
  TORCH_CHECK(key.size(3) == query.size(3), "key must have the head dim of query (", query.size(3),
              "), got ", key.size(3));
  TORCH_CHECK(key.size(1) >= 1 && heads % key.size(1) == 0,
              "key heads must divide query heads (grouped-query attention), got Hk = ", key.size(1),
              " for H = ", heads);
  TORCH_CHECK(query_positions.dim() == 2 && query_positions.size(0) == batch &&
                  query_positions.size(1) == rows,
              "query_positions must be (B, Q) = (", batch, ", ", rows, "), got shape ",
              query_positions.sizes());
  TORCH_CHECK(query_positions.scalar_type() == at::kLong, "query_positions must be int64, got ",
              query_positions.scalar_type());
  check_same_device(query_positions, "query_positions", query, "query");
  TORCH_CHECK(key_start.dim() == 1 && key_start.size(0) == batch, "key_start must be (B,) = (",
              batch, ",), got shape ", key_start.sizes());
  TORCH_CHECK(key_start.scalar_type() == at::kLong, "key_start must be int64, got ",
              key_start.scalar_type());
  check_same_device(key_start, "key_start", query, "query");
  const int64_t seq_len = key.size(2);
  TORCH_CHECK(key_length >= 0 && key_length <= seq_len,
              "key_length must lie in [0, L] with L = ", seq_len, ", got ", key_length);
  if (key_padding_mask.has_value()) {
    const auto& mask = *key_padding_mask;
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == seq_len,
                "key_padding_mask must be (B, L) = (", batch, ", ", seq_len, "), got shape ",
                mask.sizes());
    TORCH_CHECK(mask.scalar_type() == at::kBool, "key_padding_mask must be bool, got ",
                mask.scalar_type());
    check_same_device(mask, "key_padding_mask", query, "query");
  }
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), "scale must be finite, got ", *scale);
    // The GEMM takes the scale in its compute type, float32 for every input but float64.
    TORCH_CHECK(
        query.scalar_type() == at::kDouble || std::abs(*scale) <= std::numeric_limits<float>::max(),
        "scale must lie within float32's range for ", query.scalar_type(), " inputs, got ", *scale);
  }
  if (batch > 0) {
    // The one host synchronisation of the op: a window outside the keys would read
    // out of bounds, so its bounds are checked before any kernel runs.
    const auto [lo, hi] = at::aminmax(key_start);
    const auto bounds = at::stack({lo, hi}).cpu();  // both in one read
    const int64_t min_start = bounds.const_data_ptr<int64_t>()[0];
    const int64_t max_start = bounds.const_data_ptr<int64_t>()[1];
    // seq_len - key_length >= 0 (checked above); max_start + key_length could wrap.
    TORCH_CHECK(min_start >= 0 && max_start <= seq_len - key_length,
                "key_start + key_length must stay within [0, L] with L = ", seq_len,
                ", got key_start in [", min_start, ", ", max_start, "] and key_length ",
                key_length);
  }
}

at::Tensor attention_rows_by_chunks(const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& query_positions, const at::Tensor& key_start,
                                    int64_t key_length,
                                    const std::optional<at::Tensor>& key_padding_mask,
                                    std::optional<double> scale, WindowSoftmaxFn window_softmax,
                                    int64_t chunk_budget) {
  check_attention_rows_inputs(query, key, query_positions, key_start, key_length, key_padding_mask,
                              scale);
  const int64_t batch = query.size(0), heads = query.size(1), rows = query.size(2);
  const int64_t kv_heads = key.size(1), seq_len = key.size(2), head_dim = query.size(3);
  auto out = at::empty({batch, heads, rows, key_length}, query.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  // With d = 0 every score is 0 whatever the scale (the default 1/sqrt(0) is infinite).
  const double s =
      head_dim == 0 ? 1.0 : scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const auto compute = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  // Query heads sharing a key head are contiguous (h = kv * group + g), so a chunk of
  // whole key heads needs no repeated keys: (B, Hk, group*Q, d) x (B, Hk, d, L).
  const int64_t group = heads / kv_heads;
  const int64_t scores_per_kv_head = batch * group * rows * seq_len;
  const int64_t keys_per_kv_head = std::max<int64_t>(1, batch * seq_len * head_dim);  // d may be 0
  const int64_t kv_chunk = std::max<int64_t>(
      1, std::min({kv_heads, chunk_budget / scores_per_kv_head, chunk_budget / keys_per_kv_head}));
  for (int64_t kv0 = 0; kv0 < kv_heads; kv0 += kv_chunk) {
    const int64_t kvc = std::min(kv_chunk, kv_heads - kv0);
    const auto q = query.narrow(1, kv0 * group, kvc * group)
                       .to(compute)
                       .reshape({batch * kvc, group * rows, head_dim});
    // One copy, in the compute type and contiguous: a model's keys arrive as a (B, L, Hk, d)
    // buffer seen as (B, Hk, L, d), which the batched GEMM would otherwise copy once more.
    const auto key_chunk = key.narrow(1, kv0, kvc);
    const auto k =
        key_chunk.scalar_type() == compute && key_chunk.is_contiguous()
            ? key_chunk
            : at::empty(key_chunk.sizes(), key_chunk.options().dtype(compute)).copy_(key_chunk);
    // The GEMM applies the scale to its sums (alpha; beta = 0 never reads the empty buffer)
    // rather than to the query: half-precision inputs are exact in TF32, so the scores do not
    // change when the caller allows TF32 matmuls, as a pre-scaled query would.
    auto scores = at::empty({batch * kvc, group * rows, seq_len}, q.options())
                      .baddbmm_(q, k.reshape({batch * kvc, seq_len, head_dim}).transpose(1, 2),
                                /*beta=*/0, /*alpha=*/s)
                      .view({batch, kvc * group, rows, seq_len})
                      .to(at::kFloat)
                      .contiguous();
    auto window = out.narrow(1, kv0 * group, kvc * group);
    window_softmax(scores, query_positions, key_start, key_padding_mask, window);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(sdrpn, m) {
  m.def(
      "attention_rows(Tensor query, Tensor key, Tensor query_positions, Tensor key_start, "
      "int key_length, Tensor? key_padding_mask=None, float? scale=None) -> Tensor");
}

}  // namespace ops

at::Tensor attention_rows(const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& query_positions, const at::Tensor& key_start,
                          int64_t key_length, const std::optional<at::Tensor>& key_padding_mask,
                          std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdrpn::attention_rows", "")
                       .typed<decltype(attention_rows)>();
  ops::check_defined(query, "query");
  ops::check_defined(key, "key");
  ops::check_defined(query_positions, "query_positions");
  ops::check_defined(key_start, "key_start");
  return op.call(query, key, query_positions, key_start, key_length,
                 ops::defined_or_none(key_padding_mask), scale);
}

}  // namespace sdrpn
