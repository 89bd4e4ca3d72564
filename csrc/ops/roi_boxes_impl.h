#pragma once

// Private to the op: the device-independent half of roi_boxes, the hook each device's
// kernel fills in, and the op with the schema's own arguments.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "sdrpn/macros.h"
#include "sdrpn/roi_boxes.h"
#include "sdrpn/roi_math.h"

namespace sdrpn::ops {

// A grid of h x w cells holds at most h * w boxes, so a larger max_boxes acts as h * w:
// capping it sizes the per-sample box buffers by the grid, never by the argument.
inline int64_t box_slots(int64_t max_boxes, int64_t h, int64_t w) {
  return std::min(max_boxes, h * w);  // h * w < 2^31, checked first
}

void check_roi_boxes_inputs(const at::Tensor& prob, double threshold, double sigma,
                            int64_t min_area, int64_t max_area, int64_t max_boxes);

// The device half: blurs into `blurred` (B, H, W) float32, labels the components and writes
// each sample's first max_boxes + 1 kept boxes into `slots` (B, max_boxes + 1, 4) int64 and
// how many it kept (capped at max_boxes + 1) into `counts` (B,) int64. No host sync.
using RoiLabelFn = void (*)(const at::Tensor& prob, const RoiBoxOptions& options,
                            at::Tensor& blurred, at::Tensor& slots, at::Tensor& counts);

// Each device's RoiLabelFn, shared with roi_crops (defined by the roi_boxes kernel files;
// the CUDA one only in builds with CUDA).
void roi_label_cpu(const at::Tensor& prob, const RoiBoxOptions& options, at::Tensor& blurred,
                   at::Tensor& slots, at::Tensor& counts);
void roi_label_cuda(const at::Tensor& prob, const RoiBoxOptions& options, at::Tensor& blurred,
                    at::Tensor& slots, at::Tensor& counts);

// The device-independent half, called with the schema's arguments: validation,
// allocation and the final compaction (the op's one host synchronisation: the number of
// boxes).
std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes_impl(
    const at::Tensor& prob, double threshold, double sigma, int64_t min_area, int64_t max_area,
    int64_t max_boxes, bool drop_singletons, bool reference_clamp, RoiLabelFn label);

// The kept boxes (M, 4) of every sample and their batch index (M,), from the label step's
// `slots` and `counts`: a sample keeps its boxes only when it has between 1 and max_boxes.
// One host synchronisation (the number of boxes).
std::tuple<at::Tensor, at::Tensor> compact_boxes(const at::Tensor& slots, const at::Tensor& counts,
                                                 int64_t max_boxes);

// The options' box rules, in the form the kernels of both devices hand to math::write_box.
SDRPN_HOST_DEVICE math::BoxRules box_rules(const RoiBoxOptions& options) {
  return {options.min_area, options.max_area, options.max_boxes, options.drop_singletons,
          options.reference_clamp};
}

// sdrpn::roi_boxes called through the dispatcher with the schema's arguments, the options
// spread out: the typed handle takes its signature from this declaration.
std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes_dispatch(
    const at::Tensor& prob, double threshold, double sigma, int64_t min_area, int64_t max_area,
    int64_t max_boxes, bool drop_singletons, bool reference_clamp);

}  // namespace sdrpn::ops
