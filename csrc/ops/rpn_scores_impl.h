#pragma once

// Private to the op: the device-independent halves of rpn_scores and its backward, and
// the element-wise hooks each device's kernel fills in.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace sdrpn::ops {

void check_rpn_scores_inputs(const at::Tensor& query_states, const at::Tensor& visual_states,
                             const at::Tensor& q_weight, const at::Tensor& k_weight,
                             int64_t num_heads, const std::optional<at::Tensor>& q_bias,
                             const std::optional<at::Tensor>& k_bias,
                             const std::optional<at::Tensor>& visual_mask);

// Device-specific element-wise halves, fused into one pass each:
//   epilogue: out = mask ? (raw + bias_term[b]) * scale : -inf
//   backward prologue: grad_scaled = mask ? grad * scale : 0 and grad_bias_term[b] = its row sum
using RpnEpilogueFn = void (*)(const at::Tensor& raw, const at::Tensor& bias_term,
                               const std::optional<at::Tensor>& visual_mask, double scale,
                               at::Tensor& out);
using RpnGradPrologueFn = void (*)(const at::Tensor& grad,
                                   const std::optional<at::Tensor>& visual_mask, double scale,
                                   at::Tensor& grad_scaled, at::Tensor& grad_bias_term);

// Device-independent halves: validation and the GEMMs (ATen; cuBLAS on CUDA).
at::Tensor rpn_scores_forward_impl(const at::Tensor& query_states, const at::Tensor& visual_states,
                                   const at::Tensor& q_weight, const at::Tensor& k_weight,
                                   int64_t num_heads, const std::optional<at::Tensor>& q_bias,
                                   const std::optional<at::Tensor>& k_bias,
                                   const std::optional<at::Tensor>& visual_mask,
                                   RpnEpilogueFn epilogue);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rpn_scores_backward_impl(const at::Tensor& grad, const at::Tensor& query_states,
                         const at::Tensor& visual_states, const at::Tensor& q_weight,
                         const at::Tensor& k_weight, int64_t num_heads,
                         const std::optional<at::Tensor>& q_bias,
                         const std::optional<at::Tensor>& k_bias,
                         const std::optional<at::Tensor>& visual_mask, RpnGradPrologueFn prologue);

}  // namespace sdrpn::ops
