#include "sdrpn/roi_crops.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "checks.h"
#include "roi_boxes_impl.h"
#include "roi_crops_impl.h"

namespace sdrpn::ops {

void check_roi_crops_inputs(const at::Tensor& prob, double threshold, c10::string_view mode,
                            double sigma, int64_t min_area, int64_t max_area, int64_t max_boxes) {
  check_roi_boxes_inputs(prob, threshold, sigma, min_area, max_area, max_boxes);
  TORCH_CHECK(mode == "mask" || mode == "bbox", "mode must be \"mask\" or \"bbox\", got \"", mode,
              "\"");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_crops_impl(
    const at::Tensor& prob, double threshold, c10::string_view mode, double sigma, int64_t min_area,
    int64_t max_area, int64_t max_boxes, bool drop_singletons, bool reference_clamp,
    RoiLabelFn label, RoiCropFn crop) {
  check_roi_crops_inputs(prob, threshold, mode, sigma, min_area, max_area, max_boxes);
  const bool mask_mode = mode == "mask";
  max_boxes = box_slots(max_boxes, prob.size(1), prob.size(2));
  RoiBoxOptions options;
  options.threshold = threshold;
  options.sigma = sigma;
  options.min_area = min_area;
  options.max_area = max_area;
  // Mask mode only tells 0, 1 and "2 or more" boxes apart, which a cap of 1 does.
  options.max_boxes = mask_mode ? 1 : max_boxes;
  options.drop_singletons = drop_singletons;
  options.reference_clamp = reference_clamp;
  const int64_t batch = prob.size(0), h = prob.size(1), w = prob.size(2);
  const auto longs = prob.options().dtype(at::kLong);
  const auto bools = prob.options().dtype(at::kBool);
  if (batch == 0) {
    return {at::empty({0, 4}, longs), at::empty({0}, longs), at::empty({0, h, w}, bools)};
  }
  auto blurred = at::empty(prob.sizes(), prob.options().dtype(at::kFloat));
  auto slots = at::empty({batch, options.max_boxes + 1, 4}, longs);
  auto counts = at::empty({batch}, longs);
  label(prob.contiguous(), options, blurred, slots, counts);
  if (mask_mode) {
    auto boxes = at::empty({batch, 4}, longs);
    auto keep = at::empty({batch, h, w}, bools);
    auto has_crop = at::empty({batch}, bools);
    crop(blurred, threshold, slots, counts, boxes, keep, has_crop);
    const auto index = at::nonzero(has_crop).squeeze(1);  // the one host synchronisation
    return {boxes.index_select(0, index), index, keep.index_select(0, index)};
  }
  // bbox mode: roi_boxes' boxes, every token kept.
  auto [boxes, batch_index] = compact_boxes(slots, counts, options.max_boxes);
  return {boxes, batch_index, at::ones({boxes.size(0), h, w}, bools)};
}

TORCH_LIBRARY_FRAGMENT(sdrpn, m) {
  m.def(
      "roi_crops(Tensor prob, float threshold=0.15, str mode=\"mask\", float sigma=1.0, "
      "int min_area=4, int max_area=225, int max_boxes=2, bool drop_singletons=True, "
      "bool reference_clamp=True) -> (Tensor, Tensor, Tensor)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_crops_dispatch(
    const at::Tensor& prob, double threshold, c10::string_view mode, double sigma, int64_t min_area,
    int64_t max_area, int64_t max_boxes, bool drop_singletons, bool reference_clamp) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdrpn::roi_crops", "")
                       .typed<decltype(roi_crops_dispatch)>();
  return op.call(prob, threshold, mode, sigma, min_area, max_area, max_boxes, drop_singletons,
                 reference_clamp);
}

}  // namespace sdrpn::ops

namespace sdrpn {

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_crops(const at::Tensor& prob,
                                                         const RoiCropOptions& options) {
  ops::check_defined(prob, "prob");
  return ops::roi_crops_dispatch(prob, options.threshold, options.mode, options.sigma,
                                 options.min_area, options.max_area, options.max_boxes,
                                 options.drop_singletons, options.reference_clamp);
}

}  // namespace sdrpn
