#include "sdrpn/roi_boxes.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/nonzero.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "roi_boxes_impl.h"

namespace sdrpn {
namespace ops {

void check_roi_boxes_inputs(const at::Tensor& prob, double threshold, double sigma,
                            int64_t min_area, int64_t max_area, int64_t max_boxes) {
  TORCH_CHECK(prob.dim() == 3, "prob must be (B, H, W), got shape ", prob.sizes());
  check_floating(prob, "prob");
  TORCH_CHECK(prob.size(1) >= 1 && prob.size(2) >= 1, "prob's grid must be at least 1x1, got ",
              prob.size(1), "x", prob.size(2));
  // The CUDA kernels index a sample's cells with int and stride by a block; 2^30 keeps the last
  // stride inside int (a 24x24 map has 576 cells).
  int64_t cells = 0;
  TORCH_CHECK(
      !c10::mul_overflows(prob.size(1), prob.size(2), &cells) && cells <= (int64_t{1} << 30),
      "prob's grid must have at most 2^30 cells, got ", prob.size(1), "x", prob.size(2));
  TORCH_CHECK(std::isfinite(threshold), "threshold must be finite, got ", threshold);
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0.0, "sigma must be a finite number > 0, got ",
              sigma);
  TORCH_CHECK(min_area >= 0, "min_area must be >= 0, got ", min_area);
  TORCH_CHECK(max_area >= 1, "max_area must be >= 1, got ", max_area);
  TORCH_CHECK(max_boxes >= 1, "max_boxes must be >= 1, got ", max_boxes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes_impl(
    const at::Tensor& prob, double threshold, double sigma, int64_t min_area, int64_t max_area,
    int64_t max_boxes, bool drop_singletons, bool reference_clamp, RoiLabelFn label) {
  check_roi_boxes_inputs(prob, threshold, sigma, min_area, max_area, max_boxes);
  RoiBoxOptions options;
  options.threshold = threshold;
  options.sigma = sigma;
  options.min_area = min_area;
  options.max_area = max_area;
  max_boxes = box_slots(max_boxes, prob.size(1), prob.size(2));
  options.max_boxes = max_boxes;
  options.drop_singletons = drop_singletons;
  options.reference_clamp = reference_clamp;
  const int64_t batch = prob.size(0);
  const auto longs = prob.options().dtype(at::kLong);
  auto blurred = at::empty(prob.sizes(), prob.options().dtype(at::kFloat));
  auto slots = at::empty({batch, max_boxes + 1, 4}, longs);
  auto counts = at::empty({batch}, longs);
  if (batch == 0) {
    return {at::empty({0, 4}, longs), at::empty({0}, longs), blurred};
  }
  label(prob.contiguous(), options, blurred, slots, counts);
  auto [boxes, batch_index] = compact_boxes(slots, counts, max_boxes);
  return {boxes, batch_index, blurred};
}

std::tuple<at::Tensor, at::Tensor> compact_boxes(const at::Tensor& slots, const at::Tensor& counts,
                                                 int64_t max_boxes) {
  // A sample keeps its boxes only when it has between 1 and max_boxes of them.
  const auto keep_sample = (counts >= 1) & (counts <= max_boxes);
  const auto slot = at::arange(max_boxes + 1, counts.options()).unsqueeze(0);
  const auto taken = ((slot < counts.unsqueeze(1)) & keep_sample.unsqueeze(1)).flatten();
  const auto flat = at::nonzero(taken).squeeze(1);  // the one host synchronisation
  return {slots.view({-1, 4}).index_select(0, flat), at::floor_divide(flat, max_boxes + 1)};
}

TORCH_LIBRARY_FRAGMENT(sdrpn, m) {
  m.def(
      "roi_boxes(Tensor prob, float threshold=0.15, float sigma=1.0, int min_area=4, "
      "int max_area=225, int max_boxes=2, bool drop_singletons=True, bool reference_clamp=True) "
      "-> (Tensor, Tensor, Tensor)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes_dispatch(
    const at::Tensor& prob, double threshold, double sigma, int64_t min_area, int64_t max_area,
    int64_t max_boxes, bool drop_singletons, bool reference_clamp) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdrpn::roi_boxes", "")
                       .typed<decltype(roi_boxes_dispatch)>();
  return op.call(prob, threshold, sigma, min_area, max_area, max_boxes, drop_singletons,
                 reference_clamp);
}

}  // namespace ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_boxes(const at::Tensor& prob,
                                                         const RoiBoxOptions& options) {
  ops::check_defined(prob, "prob");
  return ops::roi_boxes_dispatch(prob, options.threshold, options.sigma, options.min_area,
                                 options.max_area, options.max_boxes, options.drop_singletons,
                                 options.reference_clamp);
}

}  // namespace sdrpn
