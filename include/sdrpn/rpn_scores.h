#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace sdrpn {

// The RPN head's score of every visual token against the last prompt token:
//   score_i = mean over heads h of (q_h . k_{h,i}) / sqrt(d)
//           = ((Wq x + bq) . (Wk v_i + bk)) / (H sqrt(d))        (grouped-query heads summed)
// computed as u = Wk^T qg, c = qg . bk, score_i = (u . v_i + c) / (H sqrt(d)), where qg sums
// the query heads that share a key head: two matrix-vector products and one (N x D) product
// per sample instead of projecting every visual token.
//   query_states: (B, D); visual_states: (B, N, D); q_weight: (H*d, D); k_weight: (Hk*d, D),
//   Hk dividing H; q_bias: (H*d,); k_bias: (Hk*d,); visual_mask: (B, N) bool, False cells
//   (padding of a smaller grid) score -inf and get no gradient. One floating dtype.
// Returns (B, N) in the input dtype.
at::Tensor rpn_scores(const at::Tensor& query_states, const at::Tensor& visual_states,
                      const at::Tensor& q_weight, const at::Tensor& k_weight, int64_t num_heads,
                      const std::optional<at::Tensor>& q_bias = std::nullopt,
                      const std::optional<at::Tensor>& k_bias = std::nullopt,
                      const std::optional<at::Tensor>& visual_mask = std::nullopt);

// Gradients of rpn_scores for `grad` (B, N): (query_states, visual_states, q_weight,
// k_weight, q_bias, k_bias); a bias gradient is an empty tensor when the bias is absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rpn_scores_backward(const at::Tensor& grad, const at::Tensor& query_states,
                    const at::Tensor& visual_states, const at::Tensor& q_weight,
                    const at::Tensor& k_weight, int64_t num_heads,
                    const std::optional<at::Tensor>& q_bias,
                    const std::optional<at::Tensor>& k_bias,
                    const std::optional<at::Tensor>& visual_mask);

}  // namespace sdrpn
