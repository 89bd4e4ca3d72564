#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

#include "sdrpn/roi_boxes.h"

namespace sdrpn {

// RoI crops from RPN probabilities (SPEC Stage 3, steps 2 and 2b), per sample of a batch.
// The components and box rules are roi_boxes'. "bbox" mode: roi_boxes' boxes, every token
// kept. "mask" mode (the published numbers'): 0 kept boxes give no crop, 1 gives that box
// with every token kept; 2 or more (max_boxes plays no part) give one crop, the tight box
// of all cells with blurred > threshold, whose tokens are kept where that mask, cut to the
// box and resized bilinearly (align_corners=False) to the H x W grid, is > 0.5.
//   prob: (B, H, W) floating probabilities.
// Returns boxes int64 (M, 4) as [x0, y0, x1, y1) in grid cells, batch_index int64 (M,)
// ascending and keep bool (M, H, W).
struct RoiCropOptions : RoiBoxOptions {
  std::string mode = "mask";  // "mask" or "bbox"
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_crops(const at::Tensor& prob,
                                                         const RoiCropOptions& options = {});

}  // namespace sdrpn
