// The installed headers and library, as a C++ user calls them: labels, scores with their
// gradients, and the outputs that never require grad.
#include <sdrpn/attention_rows.h>
#include <sdrpn/pseudo_labels.h>
#include <sdrpn/rpn_scores.h>
#include <torch/torch.h>

#include <iostream>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

}  // namespace

int main() {
  // One bright cell of a 2x2 grid: it is the foreground, the rest background.
  auto grounding = torch::tensor({{0.f, 0.f, 0.f, 1.f}});
  auto labels = sdrpn::pseudo_labels(grounding, torch::zeros_like(grounding), 2, 2);
  expect(torch::equal(labels, torch::tensor({{0, 0, 0, 1}}, torch::kLong)), "pseudo_labels");

  torch::manual_seed(0);
  auto x = torch::randn({2, 8}, torch::requires_grad());
  auto v = torch::randn({2, 5, 8}, torch::requires_grad());
  auto wq = torch::randn({8, 8}, torch::requires_grad());
  auto wk = torch::randn({4, 8}, torch::requires_grad());  // 2 query heads of 4, 1 key head
  auto grad = torch::randn({2, 5});
  auto scores = sdrpn::rpn_scores(x, v, wq, wk, 2);
  expect(scores.requires_grad(), "rpn_scores tracks its inputs");
  (scores * grad).sum().backward();
  auto [gx, gv, gwq, gwk, gbq, gbk] =
      sdrpn::rpn_scores_backward(grad, x.detach(), v.detach(), wq.detach(), wk.detach(), 2,
                                 std::nullopt, std::nullopt, std::nullopt);
  expect(x.grad().defined() && torch::allclose(x.grad(), gx), "rpn_scores' query gradient");
  expect(wk.grad().defined() && torch::allclose(wk.grad(), gwk), "rpn_scores' key-weight gradient");

  auto q = torch::randn({1, 2, 1, 4}, torch::requires_grad());
  auto k = torch::randn({1, 2, 6, 4});
  auto rows = sdrpn::attention_rows(q, k, torch::tensor({{5}}), torch::tensor({1}), 3);
  expect(!rows.requires_grad(), "attention_rows is not differentiable");
  expect(rows.sizes() == torch::IntArrayRef({1, 2, 1, 3}), "attention_rows' window");

  std::cout << "api_user: " << (failures ? "failed" : "ok") << "\n";
  return failures ? 1 : 0;
}
