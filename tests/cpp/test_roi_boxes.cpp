#include "sdrpn/roi_boxes.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "blob_maps.h"
#include "error_text.h"

namespace {

TEST(RoiBoxes, OneBlobOneBox) {
  auto prob = torch::zeros({2, 24, 24});
  prob.index_put_({0, torch::indexing::Slice(5, 9), torch::indexing::Slice(10, 16)}, 1.0);
  auto [boxes, index, blurred] = sdrpn::roi_boxes(prob);
  ASSERT_EQ(boxes.size(0), 1);
  EXPECT_EQ(index[0].item<int64_t>(), 0);
  EXPECT_EQ(boxes[0][0].item<int64_t>(), 9);
  EXPECT_EQ(boxes[0][1].item<int64_t>(), 4);
  EXPECT_EQ(boxes[0][2].item<int64_t>(), 17);
  EXPECT_EQ(boxes[0][3].item<int64_t>(), 10);
  EXPECT_EQ(blurred.sizes(), prob.sizes());
}

TEST(RoiBoxes, TheBlurredMapNeverRequiresGrad) {
  auto prob = torch::rand({1, 6, 6}, torch::requires_grad());
  EXPECT_FALSE(std::get<2>(sdrpn::roi_boxes(prob)).requires_grad());
}

TEST(RoiBoxes, TooManyComponentsMeansNone) {
  auto prob = torch::zeros({1, 24, 24});
  for (int64_t x : {2, 10, 18}) {
    prob.index_put_({0, torch::indexing::Slice(10, 13), torch::indexing::Slice(x, x + 3)}, 1.0);
  }
  EXPECT_EQ(std::get<0>(sdrpn::roi_boxes(prob)).size(0), 0);
  sdrpn::RoiBoxOptions three;
  three.max_boxes = 3;
  EXPECT_EQ(std::get<0>(sdrpn::roi_boxes(prob, three)).size(0), 3);
  // A max_boxes beyond the grid's cells acts as the cell count and sizes no buffer by itself.
  sdrpn::RoiBoxOptions huge;
  huge.max_boxes = INT64_MAX;
  EXPECT_EQ(std::get<0>(sdrpn::roi_boxes(prob, huge)).size(0), 3);
}

TEST(RoiBoxes, BadSigmaIsNamed) {
  sdrpn::RoiBoxOptions bad;
  bad.sigma = -1.0;
  const auto message = sdrpn::testing::error_of([&] {
    sdrpn::roi_boxes(torch::rand({1, 4, 4}), bad);
  });
  EXPECT_NE(message.find("sigma must be a finite number > 0, got -1"), std::string::npos)
      << message;
}

TEST(RoiBoxes, BlobMapsKeepABoxInEverySample) {  // what the device comparison below compares
  const auto index = std::get<1>(sdrpn::roi_boxes(sdrpn::testing::blob_maps(64)));
  EXPECT_EQ(sdrpn::testing::samples_named(index, 64), 64);
  EXPECT_GT(index.size(0), 64);  // odd samples keep two
}

TEST(RoiBoxesCuda, MatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto prob = sdrpn::testing::blob_maps(64);
  auto cpu = sdrpn::roi_boxes(prob);
  ASSERT_EQ(sdrpn::testing::samples_named(std::get<1>(cpu), 64), 64);
  auto cuda = sdrpn::roi_boxes(prob.cuda());
  EXPECT_TRUE(torch::equal(std::get<0>(cpu), std::get<0>(cuda).cpu()));
  EXPECT_TRUE(torch::equal(std::get<1>(cpu), std::get<1>(cuda).cpu()));
  EXPECT_TRUE(torch::allclose(std::get<2>(cpu), std::get<2>(cuda).cpu(), 1e-6, 1e-6));
}

TEST(RoiBoxes, AnUndefinedTensorIsNamed) {  // the dispatcher had found no tensor argument
  const auto message = sdrpn::testing::error_of([] { sdrpn::roi_boxes(at::Tensor()); });
  EXPECT_NE(message.find("prob must be a defined tensor"), std::string::npos) << message;
}

}  // namespace
