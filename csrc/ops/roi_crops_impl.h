#pragma once

// Private to the op: the device-independent half of roi_crops, the hooks each device's
// kernel fills in, and the op with the schema's own arguments.
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <tuple>

#include "roi_boxes_impl.h"
#include "sdrpn/roi_crops.h"

namespace sdrpn::ops {

void check_roi_crops_inputs(const at::Tensor& prob, double threshold, c10::string_view mode,
                            double sigma, int64_t min_area, int64_t max_area, int64_t max_boxes);

// The device half of mask mode, after the labelling (roi_boxes' RoiLabelFn run with
// max_boxes = 1, so `counts` (B,) int64 says 0, 1 or "2 or more" boxes and `slots`
// (B, 2, 4) int64 holds the first). Writes each sample's crop box into `boxes` (B, 4)
// int64, its token mask into `keep` (B, H, W) bool and whether it has a crop into
// `has_crop` (B,) bool, from `blurred` (B, H, W) float32. No host sync.
using RoiCropFn = void (*)(const at::Tensor& blurred, double threshold, const at::Tensor& slots,
                           const at::Tensor& counts, at::Tensor& boxes, at::Tensor& keep,
                           at::Tensor& has_crop);

// The device-independent half, called with the schema's arguments: validation,
// allocation, the device hooks and the final compaction (the op's one host
// synchronisation: the number of crops).
std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_crops_impl(
    const at::Tensor& prob, double threshold, c10::string_view mode, double sigma, int64_t min_area,
    int64_t max_area, int64_t max_boxes, bool drop_singletons, bool reference_clamp,
    RoiLabelFn label, RoiCropFn crop);

// sdrpn::roi_crops called through the dispatcher with the schema's arguments, the options
// spread out: the typed handle takes its signature from this declaration.
std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_crops_dispatch(
    const at::Tensor& prob, double threshold, c10::string_view mode, double sigma, int64_t min_area,
    int64_t max_area, int64_t max_boxes, bool drop_singletons, bool reference_clamp);

}  // namespace sdrpn::ops
