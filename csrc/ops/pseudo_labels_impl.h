#pragma once

// Private to the op: the argument checks every device's kernel runs first, and the op
// with the schema's own arguments.
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sdrpn::ops {

void check_pseudo_labels_inputs(const at::Tensor& grounding, const at::Tensor& sink, int64_t grid_h,
                                int64_t grid_w, double sink_threshold, double fg_ratio,
                                double bg_ratio, double max_box_fraction, int64_t ignore_index);

// sdrpn::pseudo_labels called through the dispatcher with the schema's arguments, the
// options spread out: the typed handle takes its signature from this declaration.
at::Tensor pseudo_labels_dispatch(const at::Tensor& grounding, const at::Tensor& sink,
                                  int64_t grid_h, int64_t grid_w, double sink_threshold,
                                  double fg_ratio, double bg_ratio, double max_box_fraction,
                                  int64_t ignore_index);

}  // namespace sdrpn::ops
