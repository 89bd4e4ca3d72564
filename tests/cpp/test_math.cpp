// The host/device helpers shared by the CPU and CUDA kernels.
#include <gtest/gtest.h>

#include "sdrpn/massive_activation_math.h"
#include "sdrpn/pseudo_label_math.h"

namespace sdrpn::math {
namespace {

TEST(GridBox, EmptyBoxIsTheWholeGrid) {
  const auto box = GridBox::empty();
  EXPECT_TRUE(box.is_empty());
  const auto whole = box.or_whole_grid(3, 5);
  EXPECT_EQ(whole.area(), 15);
  EXPECT_TRUE(whole.contains(2, 4));
}

TEST(GridBox, AddAndMergeGiveTheTightBox) {
  auto a = GridBox::empty();
  a.add(2, 3);
  a.add(4, 1);
  EXPECT_EQ(a.area(), 3 * 3);
  auto b = GridBox::empty();
  b.add(0, 7);
  b.merge(a);
  EXPECT_EQ(b.row0, 0);
  EXPECT_EQ(b.col0, 1);
  EXPECT_EQ(b.row1, 4);
  EXPECT_EQ(b.col1, 7);
  auto c = a;
  c.merge(GridBox::empty());
  EXPECT_EQ(c.area(), a.area());
}

TEST(PseudoLabelMath, SinkSuppressionAndStrictThresholds) {
  EXPECT_EQ(suppress_sink(0.7f, 1e-3f, 1e-3f), 0.0f);
  EXPECT_EQ(suppress_sink(0.7f, 9e-4f, 1e-3f), 0.7f);
  EXPECT_EQ(cell_label(0.3f, 0.2f, 0.1f, true, -100), kForeground);
  EXPECT_EQ(cell_label(0.2f, 0.2f, 0.1f, true, -100), -100);
  EXPECT_EQ(cell_label(0.05f, 0.2f, 0.1f, true, -100), -100);
  EXPECT_EQ(cell_label(0.05f, 0.2f, 0.1f, false, -100), kBackground);
  EXPECT_EQ(cell_label(0.1f, 0.2f, 0.1f, false, -100), -100);
}

TEST(PseudoLabelMath, BoxFractionBoundaryIsInclusive) {
  EXPECT_TRUE(box_too_large(288, 576, 0.5));
  EXPECT_FALSE(box_too_large(287, 576, 0.5));
  EXPECT_FALSE(box_too_large(1, 1, 1.5));
}

TEST(MassiveActivationMath, ComparesTheNormalisedValue) {
  // h = (30, 0, 0, 0): rms = 15, normalised 2.
  EXPECT_TRUE(is_massive_activation(30.0, 900.0, 4.0, 1.9, 0.0));
  EXPECT_FALSE(is_massive_activation(30.0, 900.0, 4.0, 2.1, 0.0));
  EXPECT_FALSE(is_massive_activation(0.0, 0.0, 4.0, 0.0, 1e-6));
}

}  // namespace
}  // namespace sdrpn::math
