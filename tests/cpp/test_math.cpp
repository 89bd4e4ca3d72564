// The host/device helpers shared by the CPU and CUDA kernels.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>

#include "sdrpn/massive_activation_math.h"
#include "sdrpn/pseudo_label_math.h"
#include "sdrpn/roi_math.h"

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

TEST(RoiMath, SmallBoxesGrowAroundTheirCentre) {
  BoxRules rules{4, 225, 2, true, true};
  CellBox singleton{5, 7, 6, 8, 1};
  EXPECT_EQ(filter_box(singleton, 24, 24, rules), BoxVerdict::kDrop);
  rules.drop_singletons = false;
  ASSERT_EQ(filter_box(singleton, 24, 24, rules), BoxVerdict::kKeep);
  // The reference's width is x1 - x0 + 1 (2 here), raised to 3 around the centre 5.5.
  EXPECT_EQ(singleton.x0, 4);
  EXPECT_EQ(singleton.y0, 6);
  EXPECT_EQ(singleton.x1, 7);
  EXPECT_EQ(singleton.y1, 9);
}

TEST(RoiMath, ReferenceClampEndsGrownBoxesOneCellShort) {
  BoxRules rules{4, 225, 2, true, true};
  CellBox corner{22, 22, 24, 24, 3};
  ASSERT_EQ(filter_box(corner, 24, 24, rules), BoxVerdict::kKeep);
  EXPECT_EQ(corner.x0, 21);
  EXPECT_EQ(corner.x1, 23);
  EXPECT_EQ(corner.y1, 23);
  rules.reference_clamp = false;
  corner = {22, 22, 24, 24, 3};
  ASSERT_EQ(filter_box(corner, 24, 24, rules), BoxVerdict::kKeep);
  EXPECT_EQ(corner.x1, 24);
  EXPECT_EQ(corner.y1, 24);
}

TEST(RoiMath, LargeBoxesAreDroppedAndOthersKeptAsTheyAre) {
  const BoxRules rules{4, 225, 2, true, true};
  CellBox large{0, 0, 16, 16, 226};
  EXPECT_EQ(filter_box(large, 24, 24, rules), BoxVerdict::kDrop);
  CellBox fits{0, 0, 15, 15, 225};
  ASSERT_EQ(filter_box(fits, 24, 24, rules), BoxVerdict::kKeep);
  EXPECT_EQ(fits.x1, 15);
  EXPECT_EQ(fits.y1, 15);
}

TEST(RoiMath, WriteBoxFillsMaxBoxesPlusOneSlots) {
  const BoxRules rules{4, 225, 1, true, true};
  std::array<int64_t, 12> slots;
  slots.fill(-7);
  int64_t kept = write_box({0, 0, 2, 2, 4}, 24, 24, rules, 0, slots.data());
  EXPECT_EQ(kept, 1);
  kept = write_box({9, 9, 10, 10, 1}, 24, 24, rules, kept, slots.data());
  EXPECT_EQ(kept, 1);
  kept = write_box({3, 4, 5, 6, 4}, 24, 24, rules, kept, slots.data());
  EXPECT_EQ(kept, 2);
  // Past max_boxes + 1 a sample is already known to have too many boxes.
  kept = write_box({7, 7, 9, 9, 4}, 24, 24, rules, kept, slots.data());
  EXPECT_EQ(kept, 2);
  const std::array<int64_t, 12> expected{0, 0, 2, 2, 3, 4, 5, 6, -7, -7, -7, -7};
  EXPECT_EQ(slots, expected);
}

}  // namespace
}  // namespace sdrpn::math
