#include "sdrpn/roi_crops.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <string>

#include "blob_maps.h"
#include "error_text.h"

namespace {

using torch::indexing::Slice;

// Two 3x3 blobs far apart on a 24x24 grid: two boxes.
torch::Tensor two_blobs() {
  auto prob = torch::zeros({1, 24, 24});
  prob.index_put_({0, Slice(10, 13), Slice(2, 5)}, 1.0);
  prob.index_put_({0, Slice(10, 13), Slice(18, 21)}, 1.0);
  return prob;
}

TEST(RoiCrops, MaskModeCoversEveryBlobWithOneCrop) {
  auto [boxes, index, keep] = sdrpn::roi_crops(two_blobs());
  ASSERT_EQ(boxes.size(0), 1);
  EXPECT_EQ(index[0].item<int64_t>(), 0);
  EXPECT_TRUE(torch::equal(boxes[0], torch::tensor({1, 9, 22, 14}, torch::kLong)));
  EXPECT_EQ(keep.sizes(), (std::vector<int64_t>{1, 24, 24}));
  EXPECT_EQ(keep.scalar_type(), torch::kBool);
  EXPECT_TRUE(keep.index({0, Slice(), Slice(1, 5)}).all().item<bool>());
  EXPECT_FALSE(keep.index({0, Slice(), Slice(6, 18)}).any().item<bool>());
  EXPECT_EQ(keep.sum().item<int64_t>(), 244);
}

TEST(RoiCrops, BboxModeIsRoiBoxes) {
  sdrpn::RoiCropOptions bbox;
  bbox.mode = "bbox";
  auto prob = two_blobs();
  auto [boxes, index, keep] = sdrpn::roi_crops(prob, bbox);
  auto [want_boxes, want_index, blurred] = sdrpn::roi_boxes(prob);
  EXPECT_TRUE(torch::equal(boxes, want_boxes));
  EXPECT_TRUE(torch::equal(index, want_index));
  EXPECT_EQ(keep.size(0), 2);
  EXPECT_TRUE(keep.all().item<bool>());
}

TEST(RoiCrops, OneBoxKeepsEveryToken) {
  auto prob = torch::zeros({2, 24, 24});
  prob.index_put_({1, Slice(5, 9), Slice(10, 16)}, 1.0);
  auto [boxes, index, keep] = sdrpn::roi_crops(prob);
  ASSERT_EQ(boxes.size(0), 1);
  EXPECT_EQ(index[0].item<int64_t>(), 1);
  EXPECT_TRUE(torch::equal(boxes[0], torch::tensor({9, 4, 17, 10}, torch::kLong)));
  EXPECT_TRUE(keep.all().item<bool>());
}

TEST(RoiCrops, BadModeIsNamed) {
  sdrpn::RoiCropOptions bad;
  bad.mode = "boxes";
  const auto message = sdrpn::testing::error_of([&] {
    sdrpn::roi_crops(torch::rand({1, 4, 4}), bad);
  });
  EXPECT_NE(message.find("mode must be \"mask\" or \"bbox\", got \"boxes\""), std::string::npos)
      << message;
}

TEST(RoiCrops, BlobMapsGiveACropOfEverySampleInBothModes) {  // what the comparison below compares
  for (const char* mode : {"mask", "bbox"}) {
    sdrpn::RoiCropOptions options;
    options.threshold = 0.3;
    options.mode = mode;
    const auto index = std::get<1>(sdrpn::roi_crops(sdrpn::testing::blob_maps(64), options));
    EXPECT_EQ(sdrpn::testing::samples_named(index, 64), 64) << mode;
  }
}

TEST(RoiCropsCuda, MatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto prob = sdrpn::testing::blob_maps(64);
  for (const char* mode : {"mask", "bbox"}) {
    sdrpn::RoiCropOptions options;
    options.threshold = 0.3;
    options.mode = mode;
    auto cpu = sdrpn::roi_crops(prob, options);
    ASSERT_EQ(sdrpn::testing::samples_named(std::get<1>(cpu), 64), 64) << mode;  // crops to compare
    auto cuda = sdrpn::roi_crops(prob.cuda(), options);
    EXPECT_TRUE(torch::equal(std::get<0>(cpu), std::get<0>(cuda).cpu())) << mode;
    EXPECT_TRUE(torch::equal(std::get<1>(cpu), std::get<1>(cuda).cpu())) << mode;
    EXPECT_TRUE(torch::equal(std::get<2>(cpu), std::get<2>(cuda).cpu())) << mode;
  }
}

TEST(RoiCrops, AnUndefinedTensorIsNamed) {
  const auto message = sdrpn::testing::error_of([] { sdrpn::roi_crops(at::Tensor()); });
  EXPECT_NE(message.find("prob must be a defined tensor"), std::string::npos) << message;
}

}  // namespace
