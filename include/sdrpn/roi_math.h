#pragma once

#include <cmath>
#include <cstdint>

#include "sdrpn/macros.h"

namespace sdrpn::math {

// Float products and sums rounded one operation at a time, as torch's CPU kernels and this
// library's CPU kernels round them: nvcc would otherwise contract a * b + c into one FMA,
// and a value that lands exactly on a threshold in one rounding would land on the other
// side in the other (the blur's taps, a crop mask's interpolated 0.5).
SDRPN_HOST_DEVICE float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SDRPN_HOST_DEVICE float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The separable 3-tap Gaussian's weights for a given sigma: sigma 1 gives
// [0.274, 0.452, 0.274]. Computed on the host for both devices' kernels, so that the
// GPU's expf cannot round them differently.
struct BlurWeights {
  float centre, side;
};

inline BlurWeights blur_weights(double sigma) {
  const auto s = static_cast<float>(sigma);
  const float side = std::exp(-1.0f / (2.0f * s * s));
  const float centre = 1.0f / (1.0f + 2.0f * side);
  return {centre, (1.0f - centre) / 2.0f};
}

// Reflect padding without repeating the edge (-1 -> 1, n -> n - 2); a length-1 axis
// has nothing to reflect and keeps its only cell.
SDRPN_HOST_DEVICE int64_t reflect_index(int64_t i, int64_t n) {
  if (n == 1) return 0;
  if (i < 0) return -i;
  if (i >= n) return 2 * (n - 1) - i;
  return i;
}

// One tap of the separable blur, rounded alike on both devices.
SDRPN_HOST_DEVICE float blur_tap(float left, float mid, float right, BlurWeights weights) {
  return add_rn(mul_rn(weights.centre, mid), mul_rn(weights.side, add_rn(left, right)));
}

// The threshold on the blurred map: absolute, or relative to the map's max when negative.
SDRPN_HOST_DEVICE float roi_threshold(double threshold, float blurred_max) {
  return threshold >= 0.0 ? static_cast<float>(threshold)
                          : blurred_max * static_cast<float>(-threshold);
}

// A component's box [x0, y0, x1, y1) in grid cells and its size in cells.
struct CellBox {
  int64_t x0, y0, x1, y1, area;
};

// The reference's rules for turning components into boxes.
struct BoxRules {
  int64_t min_area;
  int64_t max_area;
  int64_t max_boxes;
  bool drop_singletons;
  bool reference_clamp;  // grown boxes end at size - 1 as the reference's do
};

enum class BoxVerdict { kKeep, kDrop };

// The reference's treatment of one component: singletons dropped (noise or a sink),
// small ones grown around their centre to at least 3 cells a side (with the reference's
// clamp of the exclusive end to size - 1), large ones dropped.
SDRPN_HOST_DEVICE BoxVerdict filter_box(CellBox& box, int64_t grid_h, int64_t grid_w,
                                        const BoxRules& rules) {
  if (rules.drop_singletons && box.area == 1) return BoxVerdict::kDrop;
  if (box.area > rules.max_area) return BoxVerdict::kDrop;
  if (box.area < rules.min_area) {
    const double cx = (box.x0 + box.x1) / 2.0, cy = (box.y0 + box.y1) / 2.0;
    const double w = fmax(3.0, static_cast<double>(box.x1 - box.x0 + 1));
    const double h = fmax(3.0, static_cast<double>(box.y1 - box.y0 + 1));
    const auto x0 = static_cast<int64_t>(trunc(cx - w / 2.0));
    const auto x1 = static_cast<int64_t>(trunc(cx + w / 2.0));
    const auto y0 = static_cast<int64_t>(trunc(cy - h / 2.0));
    const auto y1 = static_cast<int64_t>(trunc(cy + h / 2.0));
    box.x0 = x0 > 0 ? x0 : 0;
    box.y0 = y0 > 0 ? y0 : 0;
    const int64_t x_end = rules.reference_clamp ? grid_w - 1 : grid_w;
    const int64_t y_end = rules.reference_clamp ? grid_h - 1 : grid_h;
    box.x1 = x1 < x_end ? x1 : x_end;
    box.y1 = y1 < y_end ? y1 : y_end;
  }
  return BoxVerdict::kKeep;
}

// The write step of both devices' kernels, called once per component in row-major order
// of their first cell: a box the rules keep goes as [x0, y0, x1, y1) into the next of the
// sample's max_boxes + 1 slots. Returns the new number of kept boxes, which stops at
// max_boxes + 1: that is enough for the host to tell a sample with too many boxes from
// one it keeps, whatever the number of components.
SDRPN_HOST_DEVICE int64_t write_box(CellBox box, int64_t grid_h, int64_t grid_w,
                                    const BoxRules& rules, int64_t kept, int64_t* slots) {
  if (filter_box(box, grid_h, grid_w, rules) == BoxVerdict::kDrop) return kept;
  if (kept > rules.max_boxes) return kept;
  int64_t* slot = slots + kept * 4;
  slot[0] = box.x0;
  slot[1] = box.y0;
  slot[2] = box.x1;
  slot[3] = box.y1;
  return kept + 1;
}

// One output index of a linear resize with align_corners=False: the two source indices
// and their weights, as torch.nn.functional.interpolate computes them in float32 (scale
// in / out, source index scale * (i + 0.5) - 0.5 fused, clamped at 0, the second index
// clamped to the last cell; equal sizes copy).
struct LinearTap {
  int64_t i0, i1;
  float l0, l1;
};

SDRPN_HOST_DEVICE LinearTap linear_tap(int64_t out_index, int64_t in_size, int64_t out_size) {
  if (in_size == out_size) return {out_index, out_index, 1.0f, 0.0f};
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = fmaf(scale, static_cast<float>(out_index) + 0.5f, -0.5f);
  if (src < 0.0f) src = 0.0f;
  int64_t i0 = static_cast<int64_t>(floorf(src));
  if (i0 > in_size - 1) i0 = in_size - 1;
  float l1 = src - static_cast<float>(i0);
  l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
  return {i0, i0 < in_size - 1 ? i0 + 1 : i0, 1.0f - l1, l1};
}

// Mask-mode keep of crop token (y, x) on the grid_h x grid_w crop grid: the binary mask
// blurred > threshold cut to `box`, resized bilinearly (align_corners=False) to the grid,
// then > 0.5. The corners' weights h * w are added in torch's order (00, 01, 10, 11); the
// mask is 0 or 1, so a corner contributes its weight or nothing.
SDRPN_HOST_DEVICE bool crop_keep(const float* blurred, float threshold, int64_t w,
                                 const CellBox& box, int64_t grid_h, int64_t grid_w, int64_t y,
                                 int64_t x) {
  const LinearTap ty = linear_tap(y, box.y1 - box.y0, grid_h);
  const LinearTap tx = linear_tap(x, box.x1 - box.x0, grid_w);
  const int64_t rows[2] = {box.y0 + ty.i0, box.y0 + ty.i1};
  const int64_t cols[2] = {box.x0 + tx.i0, box.x0 + tx.i1};
  const float wy[2] = {ty.l0, ty.l1};
  const float wx[2] = {tx.l0, tx.l1};
  float value = 0.0f;
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 2; ++b) {
      if (blurred[rows[a] * w + cols[b]] > threshold) value = add_rn(value, mul_rn(wy[a], wx[b]));
    }
  }
  return value > 0.5f;
}

}  // namespace sdrpn::math
