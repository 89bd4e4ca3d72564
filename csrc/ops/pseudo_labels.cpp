#include "sdrpn/pseudo_labels.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <c10/util/safe_numerics.h>

#include <cmath>
#include <string>

#include "checks.h"
#include "pseudo_labels_impl.h"

namespace sdrpn {
namespace ops {
namespace {

void check_ratio(const char* name, double value) {
  TORCH_CHECK(std::isfinite(value) && value >= 0.0, name,
              " must be a finite, non-negative number, got ", value);
}

}  // namespace

void check_pseudo_labels_inputs(const at::Tensor& grounding, const at::Tensor& sink, int64_t grid_h,
                                int64_t grid_w, double sink_threshold, double fg_ratio,
                                double bg_ratio, double max_box_fraction, int64_t ignore_index) {
  TORCH_CHECK(grounding.dim() == 2, "grounding must be (B, N), got shape ", grounding.sizes());
  TORCH_CHECK(sink.dim() == 2, "sink must be (B, N), got shape ", sink.sizes());
  check_floating(grounding, "grounding");
  TORCH_CHECK(sink.scalar_type() == grounding.scalar_type(),
              "sink must have the dtype of grounding (", grounding.scalar_type(), "), got ",
              sink.scalar_type());
  check_same_device(sink, "sink", grounding, "grounding");
  TORCH_CHECK(sink.sizes() == grounding.sizes(), "sink must have the shape of grounding (",
              grounding.sizes(), "), got ", sink.sizes());
  TORCH_CHECK(grid_h >= 1, "grid_h must be >= 1, got ", grid_h);
  TORCH_CHECK(grid_w >= 1, "grid_w must be >= 1, got ", grid_w);
  int64_t cells = 0;
  const bool overflows = c10::mul_overflows(grid_h, grid_w, &cells);
  TORCH_CHECK(!overflows && grounding.size(1) == cells, "grounding has N = ", grounding.size(1),
              " cells but grid_h * grid_w = ", grid_h, " * ", grid_w,
              overflows ? " overflows int64" : " = " + std::to_string(cells));
  TORCH_CHECK(std::isfinite(sink_threshold), "sink_threshold must be finite, got ", sink_threshold);
  check_ratio("fg_ratio", fg_ratio);
  check_ratio("bg_ratio", bg_ratio);
  TORCH_CHECK(std::isfinite(max_box_fraction) && max_box_fraction > 0.0,
              "max_box_fraction must be a finite number > 0, got ", max_box_fraction);
  TORCH_CHECK(ignore_index != 0 && ignore_index != 1,
              "ignore_index must differ from the labels 0 and 1, got ", ignore_index);
}

TORCH_LIBRARY_FRAGMENT(sdrpn, m) {
  m.def(
      "pseudo_labels(Tensor grounding, Tensor sink, int grid_h, int grid_w, "
      "float sink_threshold=0.001, float fg_ratio=0.2, float bg_ratio=0.1, "
      "float max_box_fraction=0.5, int ignore_index=-100) -> Tensor");
}

at::Tensor pseudo_labels_dispatch(const at::Tensor& grounding, const at::Tensor& sink,
                                  int64_t grid_h, int64_t grid_w, double sink_threshold,
                                  double fg_ratio, double bg_ratio, double max_box_fraction,
                                  int64_t ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdrpn::pseudo_labels", "")
                       .typed<decltype(pseudo_labels_dispatch)>();
  return op.call(grounding, sink, grid_h, grid_w, sink_threshold, fg_ratio, bg_ratio,
                 max_box_fraction, ignore_index);
}

}  // namespace ops

at::Tensor pseudo_labels(const at::Tensor& grounding, const at::Tensor& sink, int64_t grid_h,
                         int64_t grid_w, const PseudoLabelOptions& options) {
  ops::check_defined(grounding, "grounding");
  ops::check_defined(sink, "sink");
  return ops::pseudo_labels_dispatch(grounding, sink, grid_h, grid_w, options.sink_threshold,
                                     options.fg_ratio, options.bg_ratio, options.max_box_fraction,
                                     options.ignore_index);
}

}  // namespace sdrpn
