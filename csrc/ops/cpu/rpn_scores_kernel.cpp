#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>

#include "../rpn_scores_impl.h"
#include "sdrpn/rpn_scores_math.h"

namespace sdrpn::ops {
namespace {

void epilogue_cpu(const at::Tensor& raw_in, const at::Tensor& bias_term_in,
                  const std::optional<at::Tensor>& visual_mask, double scale, at::Tensor& out) {
  const auto raw = raw_in.contiguous();
  const auto bias_term = bias_term_in.contiguous();
  const auto mask = visual_mask.has_value() ? visual_mask->contiguous() : at::Tensor();
  const int64_t cells = raw.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, raw.scalar_type(), "rpn_scores_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* r = raw.const_data_ptr<scalar_t>();
        const opmath_t* c = bias_term.const_data_ptr<opmath_t>();
        const bool* m = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
        scalar_t* o = out.data_ptr<scalar_t>();
        const auto s = static_cast<opmath_t>(scale);
        const auto neg_inf = -std::numeric_limits<opmath_t>::infinity();
        at::parallel_for(0, raw.numel(), 4096, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            o[i] = static_cast<scalar_t>(math::rpn_score<opmath_t>(
                static_cast<opmath_t>(r[i]), c[i / cells], s, !m || m[i], neg_inf));
          }
        });
      });
}

void grad_prologue_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& visual_mask,
                       double scale, at::Tensor& grad_scaled, at::Tensor& grad_bias_term) {
  const auto mask = visual_mask.has_value() ? visual_mask->contiguous() : at::Tensor();
  const int64_t cells = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "rpn_scores_backward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* g = grad.const_data_ptr<scalar_t>();
        const bool* m = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
        scalar_t* gs = grad_scaled.data_ptr<scalar_t>();
        opmath_t* gc = grad_bias_term.data_ptr<opmath_t>();
        const auto s = static_cast<opmath_t>(scale);
        at::parallel_for(0, grad.size(0), 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            opmath_t row_sum = 0;
            for (int64_t i = b * cells; i < (b + 1) * cells; ++i) {
              const opmath_t v =
                  math::rpn_grad_scaled<opmath_t>(static_cast<opmath_t>(g[i]), s, !m || m[i]);
              gs[i] = static_cast<scalar_t>(v);
              row_sum += v;
            }
            gc[b] = row_sum;
          }
        });
      });
}

at::Tensor rpn_scores_kernel(const at::Tensor& query_states, const at::Tensor& visual_states,
                             const at::Tensor& q_weight, const at::Tensor& k_weight,
                             int64_t num_heads, const std::optional<at::Tensor>& q_bias,
                             const std::optional<at::Tensor>& k_bias,
                             const std::optional<at::Tensor>& visual_mask) {
  return rpn_scores_forward_impl(query_states, visual_states, q_weight, k_weight, num_heads, q_bias,
                                 k_bias, visual_mask, &epilogue_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rpn_scores_backward_kernel(const at::Tensor& grad, const at::Tensor& query_states,
                           const at::Tensor& visual_states, const at::Tensor& q_weight,
                           const at::Tensor& k_weight, int64_t num_heads,
                           const std::optional<at::Tensor>& q_bias,
                           const std::optional<at::Tensor>& k_bias,
                           const std::optional<at::Tensor>& visual_mask) {
  return rpn_scores_backward_impl(grad, query_states, visual_states, q_weight, k_weight, num_heads,
                                  q_bias, k_bias, visual_mask, &grad_prologue_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CPU, m) {
  m.impl("rpn_scores", &rpn_scores_kernel);
  m.impl("rpn_scores_backward", &rpn_scores_backward_kernel);
}

}  // namespace sdrpn::ops
