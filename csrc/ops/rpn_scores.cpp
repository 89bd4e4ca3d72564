#include "sdrpn/rpn_scores.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "rpn_scores_impl.h"

namespace sdrpn {
namespace ops {
namespace {

void check_like(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), name,
              " must have the dtype of query_states (", query.scalar_type(), "), got ",
              t.scalar_type());
  check_same_device(t, name, query, "query_states");
}

struct Heads {
  int64_t heads, kv_heads, head_dim;
};

Heads head_layout(const at::Tensor& q_weight, const at::Tensor& k_weight, int64_t num_heads) {
  const int64_t head_dim = q_weight.size(0) / num_heads;
  return {num_heads, k_weight.size(0) / head_dim, head_dim};
}

// qg: the query heads that share a key head, summed: (B, Hk*d).
at::Tensor grouped_query(const at::Tensor& query_states, const at::Tensor& q_weight,
                         const std::optional<at::Tensor>& q_bias, const Heads& h) {
  const auto q = q_bias.has_value() ? at::addmm(*q_bias, query_states, q_weight.t())
                                    : at::mm(query_states, q_weight.t());
  const int64_t batch = query_states.size(0);
  if (h.kv_heads == h.heads) return q;
  return q.view({batch, h.kv_heads, h.heads / h.kv_heads, h.head_dim})
      .sum(2)
      .reshape({batch, h.kv_heads * h.head_dim});
}

double score_scale(const Heads& h) {
  return 1.0 / (static_cast<double>(h.heads) * std::sqrt(static_cast<double>(h.head_dim)));
}

at::Tensor bias_term(const at::Tensor& qg, const std::optional<at::Tensor>& k_bias) {
  const auto opmath = qg.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (!k_bias.has_value()) return at::zeros({qg.size(0)}, qg.options().dtype(opmath));
  return at::mv(qg.to(opmath), k_bias->to(opmath));
}

}  // namespace

void check_rpn_scores_inputs(const at::Tensor& query_states, const at::Tensor& visual_states,
                             const at::Tensor& q_weight, const at::Tensor& k_weight,
                             int64_t num_heads, const std::optional<at::Tensor>& q_bias,
                             const std::optional<at::Tensor>& k_bias,
                             const std::optional<at::Tensor>& visual_mask) {
  TORCH_CHECK(query_states.dim() == 2, "query_states must be (B, D), got shape ",
              query_states.sizes());
  check_floating(query_states, "query_states");
  const int64_t batch = query_states.size(0), hidden = query_states.size(1);
  TORCH_CHECK(
      visual_states.dim() == 3 && visual_states.size(0) == batch && visual_states.size(2) == hidden,
      "visual_states must be (B, N, D) = (", batch, ", N, ", hidden, "), got shape ",
      visual_states.sizes());
  check_like(visual_states, "visual_states", query_states);
  TORCH_CHECK(num_heads >= 1, "num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK(q_weight.dim() == 2 && q_weight.size(1) == hidden && q_weight.size(0) >= num_heads &&
                  q_weight.size(0) % num_heads == 0,
              "q_weight must be (num_heads * head_dim, D) = (", num_heads, " * d, ", hidden,
              "), got shape ", q_weight.sizes());
  check_like(q_weight, "q_weight", query_states);
  const int64_t head_dim = q_weight.size(0) / num_heads;
  TORCH_CHECK(k_weight.dim() == 2 && k_weight.size(1) == hidden && k_weight.size(0) >= head_dim &&
                  k_weight.size(0) % head_dim == 0 &&
                  num_heads % (k_weight.size(0) / head_dim) == 0,
              "k_weight must be (kv_heads * ", head_dim, ", ", hidden,
              ") with kv_heads dividing num_heads = ", num_heads, ", got shape ", k_weight.sizes());
  check_like(k_weight, "k_weight", query_states);
  if (q_bias.has_value()) {
    TORCH_CHECK(q_bias->dim() == 1 && q_bias->size(0) == q_weight.size(0), "q_bias must be (",
                q_weight.size(0), ",), got shape ", q_bias->sizes());
    check_like(*q_bias, "q_bias", query_states);
  }
  if (k_bias.has_value()) {
    TORCH_CHECK(k_bias->dim() == 1 && k_bias->size(0) == k_weight.size(0), "k_bias must be (",
                k_weight.size(0), ",), got shape ", k_bias->sizes());
    check_like(*k_bias, "k_bias", query_states);
  }
  if (visual_mask.has_value()) {
    TORCH_CHECK(visual_mask->dim() == 2 && visual_mask->size(0) == batch &&
                    visual_mask->size(1) == visual_states.size(1),
                "visual_mask must be (B, N) = (", batch, ", ", visual_states.size(1),
                "), got shape ", visual_mask->sizes());
    TORCH_CHECK(visual_mask->scalar_type() == at::kBool, "visual_mask must be bool, got ",
                visual_mask->scalar_type());
    check_same_device(*visual_mask, "visual_mask", query_states, "query_states");
  }
}

at::Tensor rpn_scores_forward_impl(const at::Tensor& query_states, const at::Tensor& visual_states,
                                   const at::Tensor& q_weight, const at::Tensor& k_weight,
                                   int64_t num_heads, const std::optional<at::Tensor>& q_bias,
                                   const std::optional<at::Tensor>& k_bias,
                                   const std::optional<at::Tensor>& visual_mask,
                                   RpnEpilogueFn epilogue) {
  check_rpn_scores_inputs(query_states, visual_states, q_weight, k_weight, num_heads, q_bias,
                          k_bias, visual_mask);
  // The op computes in its inputs' dtype: autocast must not recast its inner GEMMs.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t batch = visual_states.size(0), cells = visual_states.size(1);
  auto out = at::empty({batch, cells}, visual_states.options());
  if (out.numel() == 0) return out;
  const auto h = head_layout(q_weight, k_weight, num_heads);
  const auto qg = grouped_query(query_states, q_weight, q_bias, h);
  const auto u = at::mm(qg, k_weight);                                 // (B, D)
  const auto raw = at::bmm(visual_states, u.unsqueeze(2)).squeeze(2);  // (B, N)
  epilogue(raw, bias_term(qg, k_bias), visual_mask, score_scale(h), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rpn_scores_backward_impl(const at::Tensor& grad, const at::Tensor& query_states,
                         const at::Tensor& visual_states, const at::Tensor& q_weight,
                         const at::Tensor& k_weight, int64_t num_heads,
                         const std::optional<at::Tensor>& q_bias,
                         const std::optional<at::Tensor>& k_bias,
                         const std::optional<at::Tensor>& visual_mask, RpnGradPrologueFn prologue) {
  check_rpn_scores_inputs(query_states, visual_states, q_weight, k_weight, num_heads, q_bias,
                          k_bias, visual_mask);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({visual_states.size(0), visual_states.size(1)}),
              "grad must be (B, N) = (", visual_states.size(0), ", ", visual_states.size(1),
              "), got shape ", grad.sizes());
  check_floating(grad, "grad");
  check_same_device(grad, "grad", visual_states, "visual_states");
  const auto h = head_layout(q_weight, k_weight, num_heads);
  const int64_t batch = query_states.size(0);
  // Recomputing qg and u costs two matrix-vector products; saving them would cost memory.
  const auto qg = grouped_query(query_states, q_weight, q_bias, h);
  const auto u = at::mm(qg, k_weight);

  auto grad_scaled = at::empty(grad.sizes(), visual_states.options());
  // The prologue works in the inputs' dtype (grad is cast to it) and their opmath type.
  const auto opmath = visual_states.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_bias_term = at::empty({batch}, visual_states.options().dtype(opmath));
  if (grad.numel() == 0) {
    grad_scaled.zero_();
    grad_bias_term.zero_();
  } else {
    prologue(grad.contiguous().to(visual_states.scalar_type()), visual_mask, score_scale(h),
             grad_scaled, grad_bias_term);
  }

  const auto grad_u = at::bmm(grad_scaled.unsqueeze(1), visual_states).squeeze(1);  // (B, D)
  auto grad_visual = at::bmm(grad_scaled.unsqueeze(2), u.unsqueeze(1));             // (B, N, D)
  auto grad_qg = at::mm(grad_u, k_weight.t());                                      // (B, Hk*d)
  auto grad_k_weight = at::mm(qg.t(), grad_u);                                      // (Hk*d, D)
  at::Tensor grad_k_bias = at::empty({0}, query_states.options());
  if (k_bias.has_value()) {
    const auto gb = grad_bias_term.unsqueeze(1);
    grad_qg = grad_qg + (gb * k_bias->to(opmath)).to(grad_qg.scalar_type());
    grad_k_bias = (gb * qg.to(opmath)).sum(0).to(query_states.scalar_type());
  }
  // Every query head of a group receives its group's gradient.
  const int64_t group = h.heads / h.kv_heads;
  const auto grad_q = grad_qg.view({batch, h.kv_heads, 1, h.head_dim})
                          .expand({batch, h.kv_heads, group, h.head_dim})
                          .reshape({batch, h.heads * h.head_dim});
  auto grad_query = at::mm(grad_q, q_weight);             // (B, D)
  auto grad_q_weight = at::mm(grad_q.t(), query_states);  // (H*d, D)
  at::Tensor grad_q_bias =
      q_bias.has_value() ? grad_q.sum(0) : at::empty({0}, query_states.options());
  return {grad_query, grad_visual, grad_q_weight, grad_k_weight, grad_q_bias, grad_k_bias};
}

TORCH_LIBRARY_FRAGMENT(sdrpn, m) {
  m.def(
      "rpn_scores(Tensor query_states, Tensor visual_states, Tensor q_weight, Tensor k_weight, "
      "int num_heads, Tensor? q_bias=None, Tensor? k_bias=None, Tensor? visual_mask=None) -> "
      "Tensor");
  m.def(
      "rpn_scores_backward(Tensor grad, Tensor query_states, Tensor visual_states, "
      "Tensor q_weight, Tensor k_weight, int num_heads, Tensor? q_bias, Tensor? k_bias, "
      "Tensor? visual_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace ops

at::Tensor rpn_scores(const at::Tensor& query_states, const at::Tensor& visual_states,
                      const at::Tensor& q_weight, const at::Tensor& k_weight, int64_t num_heads,
                      const std::optional<at::Tensor>& q_bias,
                      const std::optional<at::Tensor>& k_bias,
                      const std::optional<at::Tensor>& visual_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdrpn::rpn_scores", "")
                       .typed<decltype(rpn_scores)>();
  ops::check_defined(query_states, "query_states");
  ops::check_defined(visual_states, "visual_states");
  ops::check_defined(q_weight, "q_weight");
  ops::check_defined(k_weight, "k_weight");
  return op.call(query_states, visual_states, q_weight, k_weight, num_heads,
                 ops::defined_or_none(q_bias), ops::defined_or_none(k_bias),
                 ops::defined_or_none(visual_mask));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rpn_scores_backward(const at::Tensor& grad, const at::Tensor& query_states,
                    const at::Tensor& visual_states, const at::Tensor& q_weight,
                    const at::Tensor& k_weight, int64_t num_heads,
                    const std::optional<at::Tensor>& q_bias,
                    const std::optional<at::Tensor>& k_bias,
                    const std::optional<at::Tensor>& visual_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdrpn::rpn_scores_backward", "")
                       .typed<decltype(rpn_scores_backward)>();
  ops::check_defined(grad, "grad");
  ops::check_defined(query_states, "query_states");
  ops::check_defined(visual_states, "visual_states");
  ops::check_defined(q_weight, "q_weight");
  ops::check_defined(k_weight, "k_weight");
  return op.call(grad, query_states, visual_states, q_weight, k_weight, num_heads,
                 ops::defined_or_none(q_bias), ops::defined_or_none(k_bias),
                 ops::defined_or_none(visual_mask));
}

}  // namespace sdrpn
