#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../pseudo_labels_impl.h"
#include "sdrpn/pseudo_label_math.h"
#include "sdrpn/pseudo_labels.h"

namespace sdrpn::ops {
namespace {

template <typename scalar_t>
void label_samples(const at::Tensor& grounding, const at::Tensor& sink, at::Tensor& labels,
                   int64_t grid_w, const PseudoLabelOptions& opt) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t num_cells = grounding.size(1);
  const int64_t grid_h = num_cells / grid_w;
  const scalar_t* g_data = grounding.const_data_ptr<scalar_t>();
  const scalar_t* s_data = sink.const_data_ptr<scalar_t>();
  const int64_t g_stride0 = grounding.stride(0), g_stride1 = grounding.stride(1);
  const int64_t s_stride0 = sink.stride(0), s_stride1 = sink.stride(1);
  int64_t* out = labels.data_ptr<int64_t>();
  const opmath_t tau = static_cast<opmath_t>(opt.sink_threshold);

  // Each sample's sink-suppressed values are read once into a per-thread buffer; the box
  // and the labels then walk that buffer row by row (no per-cell division, no re-reading
  // or re-converting the inputs).
  at::parallel_for(0, grounding.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> values(num_cells);
    opmath_t* v = values.data();
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* g = g_data + b * g_stride0;
      const scalar_t* s = s_data + b * s_stride0;
      int64_t* row_out = out + b * num_cells;

      // x * 0 is 0 for a finite x and NaN otherwise: one sum tells whether all are finite.
      opmath_t nonfinite_probe = 0;
      opmath_t max_value = -std::numeric_limits<opmath_t>::infinity();
      for (int64_t i = 0; i < num_cells; ++i) {
        const auto gi = static_cast<opmath_t>(g[i * g_stride1]);
        const auto si = static_cast<opmath_t>(s[i * s_stride1]);
        nonfinite_probe += gi * 0 + si * 0;
        v[i] = math::suppress_sink(gi, si, tau);
        max_value = v[i] > max_value ? v[i] : max_value;
      }
      if (nonfinite_probe != 0) {  // true for NaN as well
        std::fill(row_out, row_out + num_cells, opt.ignore_index);
        continue;
      }
      const opmath_t fg_threshold = static_cast<opmath_t>(opt.fg_ratio) * max_value;
      const opmath_t bg_threshold = static_cast<opmath_t>(opt.bg_ratio) * max_value;

      auto box = math::GridBox::empty();
      for (int64_t r = 0; r < grid_h; ++r) {
        const opmath_t* row = v + r * grid_w;
        int64_t first = -1, last = -1;
        for (int64_t c = 0; c < grid_w; ++c) {
          if (row[c] > fg_threshold) {
            first = first < 0 ? c : first;
            last = c;
          }
        }
        if (first >= 0) {
          box.add(r, first);
          box.add(r, last);
        }
      }
      box = box.or_whole_grid(grid_h, grid_w);
      if (math::box_too_large(box.area(), num_cells, opt.max_box_fraction)) {
        std::fill(row_out, row_out + num_cells, opt.ignore_index);
        continue;
      }
      for (int64_t r = 0; r < grid_h; ++r) {
        const bool row_inside = r >= box.row0 && r <= box.row1;
        for (int64_t c = 0; c < grid_w; ++c) {
          const bool inside = row_inside && c >= box.col0 && c <= box.col1;
          row_out[r * grid_w + c] = math::cell_label(v[r * grid_w + c], fg_threshold, bg_threshold,
                                                     inside, opt.ignore_index);
        }
      }
    }
  });
}

at::Tensor pseudo_labels_kernel(const at::Tensor& grounding, const at::Tensor& sink, int64_t grid_h,
                                int64_t grid_w, double sink_threshold, double fg_ratio,
                                double bg_ratio, double max_box_fraction, int64_t ignore_index) {
  check_pseudo_labels_inputs(grounding, sink, grid_h, grid_w, sink_threshold, fg_ratio, bg_ratio,
                             max_box_fraction, ignore_index);
  auto labels = at::empty(grounding.sizes(), grounding.options().dtype(at::kLong));
  if (labels.numel() == 0) return labels;
  const PseudoLabelOptions options{sink_threshold, fg_ratio, bg_ratio, max_box_fraction,
                                   ignore_index};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grounding.scalar_type(), "pseudo_labels_cpu",
      [&] { label_samples<scalar_t>(grounding, sink, labels, grid_w, options); });
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdrpn, CPU, m) { m.impl("pseudo_labels", &pseudo_labels_kernel); }

}  // namespace sdrpn::ops
