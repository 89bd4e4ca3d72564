// Autograd for the ops, registered here rather than from Python so that C++ callers of
// libsdrpn get it too: rpn_scores has a backward (first order: rpn_scores_backward has
// none), attention_rows and roi_boxes are not differentiable (their outputs never require
// grad, as those of argmax). The ops with integer or boolean outputs need nothing: autograd
// never tracks those.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "sdrpn/attention_rows.h"
#include "sdrpn/roi_boxes.h"
#include "sdrpn/rpn_scores.h"

namespace sdrpn::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Absent optional tensors are saved as undefined ones and come back as std::nullopt.
std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class RpnScores : public torch::autograd::Function<RpnScores> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query_states,
                            const at::Tensor& visual_states, const at::Tensor& q_weight,
                            const at::Tensor& k_weight, int64_t num_heads,
                            const std::optional<at::Tensor>& q_bias,
                            const std::optional<at::Tensor>& k_bias,
                            const std::optional<at::Tensor>& visual_mask) {
    ctx->saved_data["num_heads"] = num_heads;
    ctx->save_for_backward({query_states, visual_states, q_weight, k_weight,
                            q_bias.value_or(at::Tensor()), k_bias.value_or(at::Tensor()),
                            visual_mask.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return sdrpn::rpn_scores(query_states, visual_states, q_weight, k_weight, num_heads, q_bias,
                             k_bias, visual_mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto q_bias = defined_or_none(saved[4]);
    const auto k_bias = defined_or_none(saved[5]);
    // Through the dispatcher, so that a gradient of these gradients meets
    // rpn_scores_backward's own autograd kernel (which refuses it).
    auto [gq, gv, gqw, gkw, gqb, gkb] = sdrpn::rpn_scores_backward(
        grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3],
        ctx->saved_data["num_heads"].toInt(), q_bias, k_bias, defined_or_none(saved[6]));
    return {gq,
            gv,
            gqw,
            gkw,
            at::Tensor(),  // num_heads
            q_bias ? gqb : at::Tensor(),
            k_bias ? gkb : at::Tensor(),
            at::Tensor()};  // visual_mask
  }
};

at::Tensor rpn_scores_autograd(const at::Tensor& query_states, const at::Tensor& visual_states,
                               const at::Tensor& q_weight, const at::Tensor& k_weight,
                               int64_t num_heads, const std::optional<at::Tensor>& q_bias,
                               const std::optional<at::Tensor>& k_bias,
                               const std::optional<at::Tensor>& visual_mask) {
  return RpnScores::apply(query_states, visual_states, q_weight, k_weight, num_heads, q_bias,
                          k_bias, visual_mask);
}

// Below autograd: the outputs come back untracked, so they never require grad.
at::Tensor attention_rows_untracked(const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& query_positions, const at::Tensor& key_start,
                                    int64_t key_length,
                                    const std::optional<at::Tensor>& key_padding_mask,
                                    std::optional<double> scale) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return sdrpn::attention_rows(query, key, query_positions, key_start, key_length, key_padding_mask,
                               scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes_untracked(
    const at::Tensor& prob, double threshold, double sigma, int64_t min_area, int64_t max_area,
    int64_t max_boxes, bool drop_singletons, bool reference_clamp) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdrpn::roi_boxes", "")
                       .typed<decltype(roi_boxes_untracked)>();
  return op.call(prob, threshold, sigma, min_area, max_area, max_boxes, drop_singletons,
                 reference_clamp);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, Autograd, m) {
  m.impl("rpn_scores", &rpn_scores_autograd);
  // A backward through it raises "the derivative ... is not implemented".
  m.impl("rpn_scores_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("attention_rows", &attention_rows_untracked);
  m.impl("roi_boxes", &roi_boxes_untracked);
}

}  // namespace sdrpn::ops
