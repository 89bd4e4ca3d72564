#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace sdrpn {

// RoI boxes from RPN probabilities (SPEC Stage 3, step 2), per sample of a batch:
// 3x3 Gaussian blur (reflect padding), threshold (negative = relative to the blurred
// map's max), 8-connected components in row-major order of their first cell, singleton
// drop, growth of small components around their centre, drop of large ones; a sample left
// with 0 or more than max_boxes boxes gets none.
//   prob: (B, H, W) floating probabilities.
// Returns boxes int64 (M, 4) as [x0, y0, x1, y1) in grid cells, batch_index int64 (M,) and
// the blurred maps float32 (B, H, W).
struct RoiBoxOptions {
  double threshold = 0.15;
  double sigma = 1.0;
  int64_t min_area = 4;
  int64_t max_area = 225;
  int64_t max_boxes = 2;
  bool drop_singletons = true;
  bool reference_clamp = true;  // grown boxes end at size - 1 as the reference's do
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes(const at::Tensor& prob,
                                                         const RoiBoxOptions& options = {});

}  // namespace sdrpn
