#include "sdrpn/massive_activation_sinks.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <string>

#include "error_text.h"

namespace {

at::Tensor planted_hidden() {
  auto h = torch::randn({2, 5, 1024}, torch::TensorOptions().dtype(torch::kFloat));
  h[0][1][7] = 1000.0f;   // normalised ~32: sink
  h[1][3][9] = -1000.0f;  // sign does not matter
  h[1][4][7] = 10.0f;     // normalised ~9.5: not a sink
  return h;
}

TEST(MassiveActivationSinks, FlagsPlantedTokens) {
  torch::manual_seed(0);
  auto sinks = sdrpn::massive_activation_sinks(planted_hidden(), {7, 9});
  auto expected = torch::zeros({2, 5}, torch::kBool);
  expected[0][1] = true;
  expected[1][3] = true;
  EXPECT_TRUE(torch::equal(sinks, expected));
}

TEST(MassiveActivationSinks, StridedHalfInput) {
  torch::manual_seed(1);
  auto h = planted_hidden();
  auto strided = h.to(torch::kHalf).transpose(1, 2).contiguous().transpose(1, 2);
  ASSERT_FALSE(strided.is_contiguous());
  EXPECT_TRUE(torch::equal(sdrpn::massive_activation_sinks(strided, {7, 9}),
                           sdrpn::massive_activation_sinks(h, {7, 9})));
}

TEST(MassiveActivationSinks, BadDimIsNamed) {
  const auto message = sdrpn::testing::error_of([] {
    sdrpn::massive_activation_sinks(torch::zeros({1, 2, 8}), {3, 8});
  });
  EXPECT_NE(message.find("dims must lie in [0, D) with D = 8, got 8"), std::string::npos)
      << message;
}

TEST(MassiveActivationSinksCuda, MatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(2);
  auto h = planted_hidden();
  EXPECT_TRUE(torch::equal(sdrpn::massive_activation_sinks(h.cuda(), {7, 9}).cpu(),
                           sdrpn::massive_activation_sinks(h, {7, 9})));
}

TEST(MassiveActivationSinks, AnUndefinedTensorIsNamed) {
  const auto message = sdrpn::testing::error_of([] {
    sdrpn::massive_activation_sinks(at::Tensor(), {7, 9});
  });
  EXPECT_NE(message.find("hidden must be a defined tensor"), std::string::npos) << message;
}

}  // namespace
