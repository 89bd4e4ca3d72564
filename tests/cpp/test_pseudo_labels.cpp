#include "sdrpn/pseudo_labels.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <limits>
#include <string>
#include <vector>

#include "blob_maps.h"
#include "error_text.h"
#include "ops/pseudo_labels_impl.h"

namespace {

using sdrpn::testing::error_of;
constexpr int64_t I = -100;

// The 4x4 example of tests/python/test_pseudo_labels.py, worked by hand.
std::pair<at::Tensor, at::Tensor> hand_example() {
  auto g = torch::tensor({0.00f, 0.05f, 0.00f, 0.50f, 0.05f, 1.00f, 0.30f, 0.00f, 0.00f, 0.15f,
                          0.90f, 0.00f, 0.15f, 0.00f, 0.00f, 0.05f})
               .view({1, 16});
  auto s = torch::zeros({1, 16});
  s[0][3] = 0.01f;
  return {g, s};
}

at::Tensor hand_expected() {
  const std::vector<int64_t> labels{0, 0, 0, 0, 0, 1, 1, 0, 0, I, 1, 0, I, 0, 0, 0};
  return torch::tensor(labels, torch::kLong).view({1, 16});
}

TEST(PseudoLabels, HandWorkedExample) {
  auto [g, s] = hand_example();
  EXPECT_TRUE(torch::equal(sdrpn::pseudo_labels(g, s, 4, 4), hand_expected()));
}

TEST(PseudoLabels, DtypesAgreeOnTheExample) {
  auto [g, s] = hand_example();
  for (auto dtype : {torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    EXPECT_TRUE(torch::equal(sdrpn::pseudo_labels(g.to(dtype), s.to(dtype), 4, 4), hand_expected()))
        << dtype;
  }
}

TEST(PseudoLabels, NonSquareGridAndStridedInput) {
  // 2x8 grid, foreground at (1, 6); stored transposed so the input is not contiguous.
  auto g = torch::zeros({16, 3}).t();
  g[0][14] = 1.0f;
  g[1][0] = 1.0f;
  g[1][15] = 1.0f;  // box 1x2 on row 0/1 col 0 and 7 -> whole width: area 16 -> ignore
  ASSERT_FALSE(g.is_contiguous());
  auto labels = sdrpn::pseudo_labels(g, torch::zeros({3, 16}), 2, 8);
  EXPECT_EQ(labels[0][14].item<int64_t>(), 1);
  EXPECT_EQ((labels[0] == 0).sum().item<int64_t>(), 15);
  EXPECT_TRUE((labels[1] == I).all().item<bool>());
  EXPECT_TRUE((labels[2] == I).all().item<bool>());  // all-zero map
}

TEST(PseudoLabels, NonFiniteSampleIsIgnored) {
  auto [g, s] = hand_example();
  auto batch_g = torch::cat({g, g});
  auto batch_s = torch::cat({s, s});
  batch_g[1][7] = std::numeric_limits<float>::quiet_NaN();
  auto labels = sdrpn::pseudo_labels(batch_g, batch_s, 4, 4);
  EXPECT_TRUE(torch::equal(labels[0], hand_expected()[0]));
  EXPECT_TRUE((labels[1] == I).all().item<bool>());
}

TEST(PseudoLabels, OptionsAreHonoured) {
  auto [g, s] = hand_example();
  sdrpn::PseudoLabelOptions options;
  options.ignore_index = -1;
  options.sink_threshold = 1.0;     // no sinks: the 0.50 cell becomes foreground,
  options.max_box_fraction = 0.75;  // the box grows to 3x3 = 9 of 16 cells
  auto labels = sdrpn::pseudo_labels(g, s, 4, 4, options);
  EXPECT_EQ(labels[0][3].item<int64_t>(), 1);
  EXPECT_EQ(labels[0][12].item<int64_t>(), -1);
}

TEST(PseudoLabels, EmptyBatch) {
  auto g = torch::empty({0, 6});
  auto labels = sdrpn::pseudo_labels(g, g, 2, 3);
  EXPECT_EQ(labels.size(0), 0);
  EXPECT_EQ(labels.scalar_type(), torch::kLong);
}

TEST(PseudoLabels, BadInputsNameTheArgument) {
  auto g = torch::rand({2, 6});
  auto s = torch::zeros({2, 6});
  const auto wrong_grid = error_of([&] { sdrpn::pseudo_labels(g, s, 2, 4); });
  EXPECT_NE(wrong_grid.find("grounding has N = 6 cells but grid_h * grid_w = 2 * 4 = 8"),
            std::string::npos)
      << wrong_grid;
  const auto flat = error_of([&] { sdrpn::pseudo_labels(g.view({12}), s, 2, 3); });
  EXPECT_NE(flat.find("grounding must be (B, N), got shape [12]"), std::string::npos) << flat;
  const auto mixed = error_of([&] { sdrpn::pseudo_labels(g, s.to(torch::kHalf), 2, 3); });
  EXPECT_NE(mixed.find("sink must have the dtype of grounding"), std::string::npos) << mixed;
  sdrpn::PseudoLabelOptions negative;
  negative.bg_ratio = -0.5;
  const auto bad_ratio = error_of([&] { sdrpn::pseudo_labels(g, s, 2, 3, negative); });
  EXPECT_NE(bad_ratio.find("bg_ratio must be a finite, non-negative number, got -0.5"),
            std::string::npos)
      << bad_ratio;
  // 2^62 + 1 times 6 wraps to 6 in int64: an unchecked product would accept it.
  const auto wrapped = error_of([&] { sdrpn::pseudo_labels(g, s, (int64_t{1} << 62) + 1, 6); });
  EXPECT_NE(wrapped.find("overflows int64"), std::string::npos) << wrapped;
  sdrpn::PseudoLabelOptions zero;
  zero.ignore_index = 0;
  const auto collides = error_of([&] { sdrpn::pseudo_labels(g, s, 2, 3, zero); });
  EXPECT_NE(collides.find("ignore_index must differ from the labels 0 and 1, got 0"),
            std::string::npos)
      << collides;
}

// Every sample of a labelled batch has foreground and background cells.
bool every_sample_labelled(const at::Tensor& labels) {
  return ((labels == 1).sum(1) > 0).all().item<bool>() &&
         ((labels == 0).sum(1) > 0).all().item<bool>();
}

TEST(PseudoLabels, BlobMapsLabelEverySampleInEveryDtype) {  // what the comparison below compares
  auto [g, s] = sdrpn::testing::blob_label_maps(512);
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    EXPECT_TRUE(every_sample_labelled(sdrpn::pseudo_labels(g.to(dtype), s.to(dtype), 24, 24)))
        << dtype;
  }
}

TEST(PseudoLabelsCuda, MatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto [g, s] = sdrpn::testing::blob_label_maps(512);
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    auto cpu = sdrpn::pseudo_labels(g.to(dtype), s.to(dtype), 24, 24);
    ASSERT_TRUE(every_sample_labelled(cpu)) << dtype;
    auto cuda = sdrpn::pseudo_labels(g.to(dtype).cuda(), s.to(dtype).cuda(), 24, 24);
    EXPECT_TRUE(torch::equal(cpu, cuda.cpu())) << dtype;
  }
}

TEST(PseudoLabels, UndefinedTensorsAreNamed) {  // it had said "sink must be (B, N), got shape [0]"
  const auto message = error_of([] {
    sdrpn::pseudo_labels(torch::rand({1, 4}), at::Tensor(), 2, 2);
  });
  EXPECT_NE(message.find("sink must be a defined tensor"), std::string::npos) << message;
}

// The device check, reached without a GPU: the argument check runs on tensors of two
// devices (cpu and meta), which the dispatcher itself would never hand to one kernel.
TEST(PseudoLabels, ATensorOnAnotherDeviceIsNamed) {
  const auto grounding = torch::zeros({1, 4});
  const auto sink = torch::zeros({1, 4}, torch::TensorOptions().device(torch::kMeta));
  const auto message = error_of([&] {
    sdrpn::ops::check_pseudo_labels_inputs(grounding, sink, 2, 2, 1e-3, 0.2, 0.1, 0.5, -100);
  });
  EXPECT_NE(message.find("sink must be on the device of grounding (cpu), got meta"),
            std::string::npos)
      << message;
  EXPECT_EQ(error_of([&] {
              sdrpn::ops::check_pseudo_labels_inputs(grounding, grounding, 2, 2, 1e-3, 0.2, 0.1,
                                                     0.5, -100);
            }),
            "");
}

}  // namespace
