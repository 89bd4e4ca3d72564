#include "sdrpn/rpn_scores.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "error_text.h"

namespace {

// The naive head: every visual token projected to keys (biases where defined), per-head
// dot, mean over heads.
at::Tensor naive(const at::Tensor& x, const at::Tensor& v, const at::Tensor& wq,
                 const at::Tensor& wk, int64_t heads, int64_t head_dim, const at::Tensor& bq = {},
                 const at::Tensor& bk = {}) {
  const int64_t kv_heads = wk.size(0) / head_dim;
  auto q = torch::matmul(x, wq.t());
  auto k = torch::matmul(v, wk.t());
  if (bq.defined()) q = q + bq;
  if (bk.defined()) k = k + bk;
  q = q.view({x.size(0), heads, head_dim});
  k = k.view({v.size(0), v.size(1), kv_heads, head_dim}).repeat_interleave(heads / kv_heads, 2);
  return torch::einsum("bhd,bnhd->bnh", {q, k}).mean(-1) / std::sqrt(static_cast<double>(head_dim));
}

TEST(RpnScores, MatchesTheNaiveHeadWithGroupedHeads) {
  torch::manual_seed(0);
  auto x = torch::randn({3, 16});
  auto v = torch::randn({3, 7, 16});
  auto wq = torch::randn({16, 16}) * 0.3;
  auto wk = torch::randn({8, 16}) * 0.3;  // 4 query heads of 4, 2 key heads
  auto got = sdrpn::rpn_scores(x, v, wq, wk, 4);
  EXPECT_TRUE(torch::allclose(got, naive(x, v, wq, wk, 4, 4), 1e-5, 1e-5));
}

TEST(RpnScores, BackwardGivesTheNaiveGradients) {
  torch::manual_seed(1);
  auto x = torch::randn({2, 8}, torch::requires_grad());
  auto v = torch::randn({2, 5, 8}, torch::requires_grad());
  auto wq = torch::randn({8, 8}, torch::requires_grad());
  auto wk = torch::randn({8, 8}, torch::requires_grad());
  auto grad = torch::randn({2, 5});
  (naive(x, v, wq, wk, 2, 4) * grad).sum().backward();
  auto [gx, gv, gwq, gwk, gbq, gbk] =
      sdrpn::rpn_scores_backward(grad, x.detach(), v.detach(), wq.detach(), wk.detach(), 2,
                                 std::nullopt, std::nullopt, std::nullopt);
  EXPECT_TRUE(torch::allclose(gx, x.grad(), 1e-4, 1e-5));
  EXPECT_TRUE(torch::allclose(gv, v.grad(), 1e-4, 1e-5));
  EXPECT_TRUE(torch::allclose(gwq, wq.grad(), 1e-4, 1e-5));
  EXPECT_TRUE(torch::allclose(gwk, wk.grad(), 1e-4, 1e-5));
  EXPECT_EQ(gbq.numel(), 0);
  EXPECT_EQ(gbk.numel(), 0);
}

TEST(RpnScores, AutogradGivesTheNaiveGradientsWithBiases) {
  torch::manual_seed(3);
  auto x = torch::randn({2, 8}, torch::requires_grad());
  auto v = torch::randn({2, 5, 8}, torch::requires_grad());
  auto wq = torch::randn({8, 8}, torch::requires_grad());
  auto wk = torch::randn({4, 8}, torch::requires_grad());
  auto bq = torch::randn({8}, torch::requires_grad());
  auto bk = torch::randn({4}, torch::requires_grad());
  auto grad = torch::randn({2, 5});
  (sdrpn::rpn_scores(x, v, wq, wk, 2, bq, bk) * grad).sum().backward();
  std::vector<at::Tensor> ours;
  for (auto* t : {&x, &v, &wq, &wk, &bq, &bk}) {
    ours.push_back(t->grad().clone());
    t->mutable_grad().reset();
  }
  (naive(x, v, wq, wk, 2, 4, bq, bk) * grad).sum().backward();
  int i = 0;
  for (auto* t : {&x, &v, &wq, &wk, &bq, &bk}) {
    EXPECT_TRUE(torch::allclose(ours[i++], t->grad(), 1e-4, 1e-5)) << "input " << i;
  }
}

TEST(RpnScores, SecondOrderGradientsAreRefused) {
  auto x = torch::randn({2, 8}, torch::requires_grad());
  auto scores =
      sdrpn::rpn_scores(x, torch::randn({2, 5, 8}), torch::randn({8, 8}), torch::randn({8, 8}), 2);
  auto gx = torch::autograd::grad({scores.pow(2).sum()}, {x}, {}, std::nullopt, true)[0];
  EXPECT_THAT(sdrpn::testing::error_of([&] { gx.sum().backward(); }),
              ::testing::HasSubstr("derivative for sdrpn::rpn_scores_backward is not implemented"));
}

TEST(RpnScoresCuda, MatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(2);
  auto x = torch::randn({4, 64});
  auto v = torch::randn({4, 30, 64});
  auto wq = torch::randn({64, 64}) * 0.1;
  auto wk = torch::randn({64, 64}) * 0.1;
  auto cpu = sdrpn::rpn_scores(x, v, wq, wk, 8);
  auto cuda = sdrpn::rpn_scores(x.cuda(), v.cuda(), wq.cuda(), wk.cuda(), 8);
  EXPECT_TRUE(torch::allclose(cpu, cuda.cpu(), 1e-4, 1e-4));
}

// A C++ caller can pass at::Tensor(): each is named before the dispatcher sees it (it had said
// "tensor does not have a device"), and optionals holding one are absent.
TEST(RpnScores, UndefinedTensorsAreNamed) {
  torch::manual_seed(0);
  auto x = torch::randn({2, 16});
  auto v = torch::randn({2, 5, 16});
  auto wq = torch::randn({16, 16});
  auto wk = torch::randn({16, 16});
  const auto message =
      sdrpn::testing::error_of([&] { sdrpn::rpn_scores(at::Tensor(), v, wq, wk, 4); });
  EXPECT_NE(message.find("query_states must be a defined tensor"), std::string::npos) << message;
  const auto backward = sdrpn::testing::error_of([&] {
    sdrpn::rpn_scores_backward(at::Tensor(), x, v, wq, wk, 4, std::nullopt, std::nullopt,
                               std::nullopt);
  });
  EXPECT_NE(backward.find("grad must be a defined tensor"), std::string::npos) << backward;
  EXPECT_TRUE(
      torch::equal(sdrpn::rpn_scores(x, v, wq, wk, 4, at::Tensor(), at::Tensor(), at::Tensor()),
                   sdrpn::rpn_scores(x, v, wq, wk, 4)));
}

}  // namespace
