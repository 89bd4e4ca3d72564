#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sdrpn {

// Thresholds of SPEC Stage 1 ("Labelling"); the defaults are the reference values.
struct PseudoLabelOptions {
  // tau_sink: sink map value at which a token is a sink.
  double sink_threshold = 1e-3;
  // alpha: foreground where value > alpha * max.
  double fg_ratio = 0.2;
  // beta: background where value < beta * max, outside the box.
  double bg_ratio = 0.1;
  // rho: a box covering >= rho * N cells makes the sample all-ignore.
  double max_box_fraction = 0.5;
  int64_t ignore_index = -100;
};

// Pseudo labels for a batch of attention maps.
//   grounding, sink: (B, N) float32/float64/float16/bfloat16 on one device, N == grid_h * grid_w,
//   cells in row-major grid order.
// Returns int64 (B, N): 1 foreground, 0 background, ignore_index elsewhere. A sample holding
// NaN or Inf in either map is all ignore_index.
at::Tensor pseudo_labels(const at::Tensor& grounding, const at::Tensor& sink, int64_t grid_h,
                         int64_t grid_w, const PseudoLabelOptions& options = {});

}  // namespace sdrpn
